// claudemesh ui: the page. Plain JavaScript, no build step, no outside assets.
//
// Every peer-provided string (names, summaries, folders, message text) goes
// into the DOM as a text node or an attribute value through el() below:
// nothing here assigns innerHTML, so markup in a display name is shown as
// the characters it is.
"use strict";

(function () {
  const params = new URLSearchParams(location.search);
  const token = params.get("token") || "";
  const ui = {
    mesh: params.get("mesh") || null,
    meshes: [],
    presence: null,
    messages: new Map(),
    conversation: "*",
    live: null,
    liveAttempt: 0,
  };

  // -- DOM helpers ------------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function $(id) {
    return document.getElementById(id);
  }

  function notice(text, bad) {
    const node = $("notice");
    node.textContent = text;
    node.className = bad ? "bad" : "good";
  }

  function short(key) {
    return key ? key.slice(0, 8) + "…" : "?";
  }

  function age(iso) {
    const then = Date.parse(iso || "");
    if (Number.isNaN(then)) return "";
    const seconds = Math.max(0, Math.round((Date.now() - then) / 1000));
    if (seconds < 60) return seconds + "s";
    if (seconds < 3600) return Math.floor(seconds / 60) + "m";
    if (seconds < 86400) return Math.floor(seconds / 3600) + "h";
    return Math.floor(seconds / 86400) + "d";
  }

  function clock(ms) {
    if (typeof ms !== "number") return "";
    const d = new Date(ms);
    const today = new Date();
    const time = d.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit", second: "2-digit"});
    return d.toDateString() === today.toDateString() ? time : d.toLocaleDateString() + " " + time;
  }

  // -- talking to the UI server -------------------------------------------------

  async function api(name, body) {
    const options = {headers: {"Authorization": "Bearer " + token}, cache: "no-store",
                     credentials: "omit"};
    let url = "/api/" + name;
    if (body === undefined) {
      if (ui.mesh) url += "?mesh=" + encodeURIComponent(ui.mesh);
    } else {
      options.method = "POST";
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(Object.assign({mesh: ui.mesh}, body));
    }
    const response = await fetch(url, options);
    let document_ = {};
    try {
      document_ = await response.json();
    } catch (e) {
      document_ = {error: String(response.status), message: response.statusText};
    }
    if (!response.ok) {
      const error = new Error((document_.error || response.status) + ": " +
                              (document_.message || ""));
      error.candidates = document_.candidates || [];
      throw error;
    }
    return document_;
  }

  function connectLive() {
    if (ui.live) ui.live.close();
    const url = "ws://" + location.host + "/live?token=" + encodeURIComponent(token) +
      (ui.mesh ? "&mesh=" + encodeURIComponent(ui.mesh) : "");
    const socket = new WebSocket(url);
    ui.live = socket;
    socket.onopen = () => { ui.liveAttempt = 0; };
    socket.onmessage = (event) => {
      let data;
      try {
        data = JSON.parse(event.data);
      } catch (e) {
        return;
      }
      receive(data);
    };
    socket.onclose = () => {
      if (ui.live !== socket) return;
      ui.live = null;
      setState("ui server gone — retrying", "bad");
      const delay = Math.min(5000, 500 * 2 ** ui.liveAttempt++);
      setTimeout(connectLive, delay);
    };
  }

  function receive(data) {
    if (data.type === "snapshot") {
      ui.messages = new Map();
      for (const m of data.messages || []) ui.messages.set(m.key, m);
      ui.presence = data.presence;
      renderAll();
    } else if (data.type === "presence") {
      ui.presence = data.presence;
      renderPresence();
      renderConversations();
      renderMessages();
    } else if (data.type === "messages") {
      for (const m of data.messages || []) ui.messages.set(m.key, m);
      renderConversations();
      renderMessages();
    }
  }

  // -- names ------------------------------------------------------------------------

  function nameOf(key) {
    const p = ui.presence;
    if (!p || !key) return short(key);
    if (key === p.me.memberPubkey || key === p.me.sessionPubkey) return "you";
    for (const m of p.members) if (m.memberPubkey === key) return m.name;
    for (const s of p.sessions) if (s.pubkey === key || s.memberPubkey === key) return s.displayName;
    return short(key);
  }

  function isKey(text) {
    return /^[0-9a-f]{64}$/.test(text || "");
  }

  function conversationTitle(key) {
    if (key === "*" || key === "@all") return "everyone (*)";
    if (key.startsWith("@") || !isKey(key)) return key;
    return nameOf(key);
  }

  // -- rendering --------------------------------------------------------------------

  function setState(text, kind) {
    const node = $("state");
    node.textContent = text;
    node.className = "badge " + (kind || "");
  }

  function renderAll() {
    renderPresence();
    renderConversations();
    renderMessages();
  }

  function isModerator() {
    const role = ui.presence && ui.presence.me.role;
    return role === "owner" || role === "admin";
  }

  function renderPresence() {
    const p = ui.presence;
    if (!p) return;
    $("mesh-name").textContent = p.mesh.name;
    $("me").textContent = "you: " + (p.me.displayName || "?") + " (" + p.me.role + ")";
    setState(p.state, p.state === "connected" ? "good" : "bad");
    const problem = $("problem");
    problem.hidden = !p.problem;
    problem.textContent = p.problem || "";
    $("admin-panel").hidden = !isModerator();
    renderMeshKey(p.meshKey || {});

    const byMember = new Map();
    for (const s of p.sessions) {
      if (!byMember.has(s.memberPubkey)) byMember.set(s.memberPubkey, []);
      byMember.get(s.memberPubkey).push(s);
    }
    const list = $("members");
    list.replaceChildren();
    const seen = new Set();
    const rows = p.members.slice();
    for (const key of byMember.keys()) {
      if (!p.members.some((m) => m.memberPubkey === key)) {
        const s = byMember.get(key)[0];
        rows.push({name: s.displayName, memberPubkey: key, role: s.role, online: true});
      }
    }
    for (const m of rows) {
      if (seen.has(m.memberPubkey)) continue;
      seen.add(m.memberPubkey);
      const sessions = byMember.get(m.memberPubkey) || [];
      const online = sessions.some((s) => s.online);
      const mine = m.memberPubkey === p.me.memberPubkey;
      const item = el("li", {class: "member" + (online ? " online" : ""),
                             dataset: {pubkey: m.memberPubkey}},
        el("div", {class: "member-line"},
          el("span", {class: "dot", title: online ? "online" : "offline"}),
          el("span", {class: "name"}, m.name),
          mine ? el("span", {class: "you"}, "(you)") : null,
          el("span", {class: "role"}, m.role),
          el("code", {class: "key", title: m.memberPubkey}, short(m.memberPubkey)),
          mine ? null : el("button", {type: "button", class: "talk",
                                       onclick: () => openConversation(m.memberPubkey)},
                           "message")),
        memberActions(m, mine),
        el("ul", {class: "sessions"}, ...sessions.map((s) => sessionRow(s, mine))));
      list.append(item);
    }
  }

  // Issue 17: the current key epoch, and who left since the key last changed.
  function renderMeshKey(key) {
    $("key-epoch").textContent = key.epoch === null || key.epoch === undefined
      ? "key epoch: not known yet"
      : "key epoch " + key.epoch + (key.held === false ? " (this member does not hold its key)" : "");
    const warning = $("key-notice");
    warning.hidden = !key.notice;
    warning.textContent = key.notice || "";
  }

  async function rotateKey() {
    if (!(await confirmThen("Rotate the mesh key? Every current member is sealed the new key; "
                            + "members who left or were banned never get it."))) return;
    try {
      const reply = await api("rotate-key", {reason: "manual"});
      notice("mesh key rotated to epoch " + reply.epoch + ", sealed for " + reply.members.join(", "));
    } catch (e) {
      notice("rotate failed: " + e.message, true);
    }
  }

  function memberActions(m, mine) {
    if (!isModerator() || mine || m.role === "owner") return null;
    const role = m.role === "admin" ? "member" : "admin";
    return el("div", {class: "actions"},
      el("button", {type: "button", class: "ban",
                    onclick: () => act("ban", m.memberPubkey, m.name)}, "ban"),
      ui.presence.me.role === "owner"
        ? el("button", {type: "button", class: "role-change",
                        onclick: () => act("set_role", m.memberPubkey, m.name, role)},
             "make " + role)
        : null);
  }

  function statusDetail(source, since) {
    return (source || "?") + " · " + age(since);
  }

  // Ages tick without rebuilding the lists (a rebuild would lose focus and
  // selection).
  function updateAges() {
    for (const node of document.querySelectorAll(".status-detail")) {
      node.textContent = statusDetail(node.dataset.source, node.dataset.since);
    }
  }

  function sessionRow(s, mine) {
    const groups = (s.groups || []).map((g) => "@" + g.name + (g.role ? ":" + g.role : ""));
    const details = [];
    if (s.peerType) details.push(s.peerType);
    if (s.channel) details.push(s.channel);
    if (s.model) details.push(s.model);
    const actions = isModerator() && !mine && s.role !== "owner"
      ? el("span", {class: "actions"},
          el("button", {type: "button", class: "disconnect",
                        onclick: () => act("disconnect", s.pubkey, s.displayName)}, "disconnect"),
          el("button", {type: "button", class: "kick",
                        onclick: () => act("kick", s.pubkey, s.displayName)}, "kick"))
      : null;
    return el("li", {class: "session " + (s.online ? "live" : "grace"),
                     dataset: {sessionId: s.sessionId, status: s.status}},
      el("div", {},
        el("span", {class: "status status-" + s.status}, s.status),
        el("span", {class: "status-detail", dataset: {source: s.statusSource || "",
                                                       since: s.statusUpdatedAt || ""}},
           statusDetail(s.statusSource, s.statusUpdatedAt)),
        el("span", {class: "session-name"}, s.displayName),
        s.online ? null : el("span", {class: "grace"}, "reconnecting"),
        details.length ? el("span", {class: "peer-type"}, details.join(" · ")) : null,
        actions),
      s.summary ? el("div", {class: "summary"}, s.summary) : null,
      el("div", {class: "where"},
        s.hostname ? el("span", {class: "host"}, s.hostname) : null,
        s.cwd ? el("code", {class: "cwd"}, s.cwd) : null,
        groups.length ? el("span", {class: "groups"}, groups.join(" ")) : null,
        el("code", {class: "key", title: s.pubkey}, short(s.pubkey))));
  }

  function conversationKeys() {
    const keys = new Set(["*"]);
    const p = ui.presence;
    if (p) {
      for (const s of p.sessions) for (const g of s.groups || []) keys.add("@" + g.name);
    }
    for (const m of ui.messages.values()) if (m.conversation) keys.add(m.conversation);
    if (p) {
      for (const m of p.members) if (m.memberPubkey !== p.me.memberPubkey) keys.add(m.memberPubkey);
    }
    keys.delete(p ? p.me.memberPubkey : "");
    return Array.from(keys);
  }

  function renderConversations() {
    const counts = new Map();
    for (const m of ui.messages.values()) counts.set(m.conversation, (counts.get(m.conversation) || 0) + 1);
    const list = $("conversations");
    list.replaceChildren();
    for (const key of conversationKeys()) {
      list.append(el("li", {class: key === ui.conversation ? "selected" : "",
                            dataset: {conversation: key}},
        el("button", {type: "button", onclick: () => openConversation(key)},
          conversationTitle(key),
          counts.get(key) ? el("span", {class: "count"}, counts.get(key)) : null)));
    }
    $("conversation-title").textContent = conversationTitle(ui.conversation);
  }

  function openConversation(key) {
    ui.conversation = key;
    $("send-to").value = key;
    renderConversations();
    renderMessages();
    $("send-text").focus();
  }

  function renderMessages() {
    const list = $("messages");
    const shown = Array.from(ui.messages.values())
      .filter((m) => m.conversation === ui.conversation)
      .sort((a, b) => (a.at || 0) - (b.at || 0));
    list.replaceChildren();
    for (const m of shown) {
      const from = m.kind === "sent" ? "you" : nameOf(m.senderMemberPubkey || m.senderPubkey);
      const to = m.kind === "sent" ? nameOf(m.targetSpec) : (m.targetSpec === "*" ||
        (m.targetSpec || "").startsWith("@") ? m.targetSpec : "you");
      const body = m.text !== null && m.text !== undefined ? m.text : "[" + (m.error || "unreadable") + "]";
      list.append(el("li", {class: "message " + m.kind, dataset: {messageId: m.messageId}},
        el("div", {class: "meta"},
          el("time", {}, clock(m.at)),
          el("span", {class: "from"}, from),
          " → ",
          el("span", {class: "to"}, to),
          el("span", {class: "priority"}, m.priority),
          el("span", {class: "via", title: m.sessionId || ""}, "via " + (m.via || "?")),
          m.kind === "sent"
            ? el("span", {class: "delivery delivery-" + m.delivery.replace(/ /g, "-"),
                          title: (m.recipients || []).map((r) => r.name + ": " + r.status).join(", ")},
                 m.delivery)
            : null),
        el("div", {class: "text"}, body)));
    }
    list.scrollTop = list.scrollHeight;
  }

  // -- actions ------------------------------------------------------------------------

  function confirmThen(text) {
    const dialog = $("confirm-dialog");
    $("confirm-text").textContent = text;
    return new Promise((resolve) => {
      const done = (answer) => {
        $("confirm-yes").onclick = null;
        $("confirm-no").onclick = null;
        dialog.close();
        resolve(answer);
      };
      $("confirm-yes").onclick = () => done(true);
      $("confirm-no").onclick = () => done(false);
      dialog.showModal();
    });
  }

  const VERBS = {
    disconnect: "Disconnect %s? Their sessions reconnect by themselves within seconds.",
    kick: "Kick %s? Their session ends; they can rejoin by running claudemesh.",
    ban: "Ban %s? They can no longer connect or rejoin until unbanned, and the mesh key is "
      + "rotated so they cannot read what is broadcast from now on.",
    unban: "Unban %s?",
    set_role: "Make %s %r?",
  };

  async function act(action, target, name, role) {
    const question = VERBS[action].replace("%s", '"' + name + '"').replace("%r", role || "");
    if (!(await confirmThen(question))) return;
    try {
      const reply = await api("moderate", {action, target, role});
      const affected = reply.affected || reply.kicked;
      notice(action + ": " + (affected ? (affected.length ? affected.join(", ") : "nobody matched")
        : (reply.banned || reply.unbanned || reply.target || "done"))
        + (reply.rotated ? "; mesh key rotated to epoch " + reply.rotated.epoch : "")
        + (reply.rotateError ? "; the mesh key was NOT rotated: " + reply.rotateError.message : ""),
        Boolean(reply.rotateError));
      if (action === "ban" || action === "unban") loadBans();
    } catch (e) {
      notice(action + " failed: " + e.message, true);
    }
  }

  async function send(event) {
    event.preventDefault();
    const to = $("send-to").value.trim();
    const text = $("send-text").value;
    if (!to || !text) return;
    $("send-button").disabled = true;
    try {
      const reply = await api("send", {to, text, priority: $("send-priority").value});
      $("send-text").value = "";
      notice("sent to " + conversationTitle(to) + " (" + reply.messageId.slice(0, 8) + ")");
      const m = ui.messages.get("sent:" + reply.messageId);
      if (m && m.conversation !== ui.conversation) openConversation(m.conversation);
    } catch (e) {
      const names = (e.candidates || []).map((c) => c.name + " " + short(c.pubkey)).join(", ");
      notice("send failed: " + e.message + (names ? " — " + names : ""), true);
    } finally {
      $("send-button").disabled = false;
    }
  }

  async function invite(event) {
    event.preventDefault();
    try {
      const reply = await api("invite", {role: $("invite-role").value,
                                         uses: Number($("invite-uses").value) || 1,
                                         expiresIn: Number($("invite-expires").value)});
      $("invite-link").value = reply.link;
      if (typeof reply.qr === "string" && reply.qr.startsWith("data:image/svg+xml")) {
        $("invite-qr").src = reply.qr;
      }
      $("invite-result").hidden = false;
      notice("invite " + reply.inviteId + " created");
      loadInvites();
    } catch (e) {
      notice("invite failed: " + e.message, true);
    }
  }

  async function loadInvites() {
    if (!isModerator()) return;
    try {
      const reply = await api("invites");
      const now = Date.now() / 1000;
      $("invites").replaceChildren(...reply.invites.map((i) => {
        const state = i.revoked ? "revoked" : i.expiresAt < now ? "expired"
          : (i.usedCount || 0) >= i.maxUses ? "used up" : "open";
        return el("li", {class: "invite", dataset: {inviteId: i.inviteId}},
          el("code", {}, i.inviteId.slice(0, 12)), " ", i.role, " · used ",
          (i.usedCount || 0) + "/" + i.maxUses, " · ",
          el("span", {class: "invite-state"}, state), " ",
          state === "open" ? el("button", {type: "button", class: "revoke",
            onclick: () => revoke(i.inviteId)}, "revoke") : null);
      }));
    } catch (e) {
      notice("invites: " + e.message, true);
    }
  }

  async function revoke(inviteId) {
    if (!(await confirmThen("Revoke invite " + inviteId + "? Nobody can join with it after."))) return;
    try {
      await api("revoke-invite", {inviteId});
      notice("invite " + inviteId + " revoked");
      loadInvites();
    } catch (e) {
      notice("revoke failed: " + e.message, true);
    }
  }

  async function loadBans() {
    if (!isModerator()) return;
    try {
      const reply = await api("bans");
      const list = $("bans");
      if (!reply.bans.length) {
        list.replaceChildren(el("li", {class: "empty"}, "nobody is banned"));
        return;
      }
      list.replaceChildren(...reply.bans.map((b) => el("li", {class: "ban-row", dataset: {pubkey: b.pubkey}},
        el("span", {class: "name"}, b.name), " ",
        el("code", {class: "key"}, short(b.pubkey)), " since ", b.revokedAt, " ",
        el("button", {type: "button", class: "unban",
                      onclick: () => act("unban", b.pubkey, b.name)}, "unban"))));
    } catch (e) {
      notice("bans: " + e.message, true);
    }
  }

  async function loadAudit() {
    if (!isModerator()) return;
    try {
      const reply = await api("audit");
      const valid = $("audit-valid");
      valid.textContent = reply.valid
        ? "✓ hash chain verified (" + reply.checked + " entries)"
        : "✗ hash chain BROKEN at entry " + reply.brokenAt;
      valid.className = reply.valid ? "good" : "bad";
      $("audit").replaceChildren(...reply.entries.map((e) => el("li", {},
        el("time", {}, e.createdAt), " #" + e.seq + " ",
        el("strong", {}, e.eventType), " by ", e.actor, " ",
        el("code", {}, JSON.stringify(e.payload)))));
    } catch (e) {
      notice("audit: " + e.message, true);
    }
  }

  function loadAdmin() {
    loadInvites();
    loadBans();
    loadAudit();
  }

  async function start() {
    $("send-form").addEventListener("submit", send);
    $("invite-form").addEventListener("submit", invite);
    $("invites-refresh").addEventListener("click", loadInvites);
    $("bans-refresh").addEventListener("click", loadBans);
    $("rotate-key").addEventListener("click", rotateKey);
    $("audit-refresh").addEventListener("click", loadAudit);
    $("send-to").value = ui.conversation;
    try {
      const reply = await api("meshes");
      ui.meshes = reply.meshes;
      ui.mesh = ui.mesh || reply.default;
    } catch (e) {
      notice("cannot reach the claudemesh ui server: " + e.message, true);
      return;
    }
    const picker = $("mesh-picker");
    picker.replaceChildren(...ui.meshes.map((m) =>
      el("option", {value: m.slug, selected: m.slug === ui.mesh},
         m.slug === m.name ? m.slug : m.slug + " — " + m.name)));
    picker.addEventListener("change", () => {
      ui.mesh = picker.value;
      ui.presence = null;
      ui.messages = new Map();
      connectLive();
      setTimeout(loadAdmin, 1500);
    });
    connectLive();
    setTimeout(loadAdmin, 1500);
    setInterval(updateAges, 5000);
  }

  document.addEventListener("DOMContentLoaded", start);
})();
