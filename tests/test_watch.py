# -*- test-case-name: tests.test_watch -*-
"""
Tests for watching sessions (C{hello {watch: true}}, what C{claudemesh ui}
says): they see presence and status, take the messages sent to their own
session key, and never take anything meant for their member's other
sessions nor show up as a peer. The broker runs on a memory store and a fake
clock.
"""

from twisted.trial import unittest

from claudemesh import crypto
from tests.meshfixture import BrokerFixture, result_of


class WatchTestCase(unittest.TestCase):
    def setUp(self):
        self.fx = BrokerFixture()
        self.owner = self.fx.create_mesh()
        self.alice = self.fx.add_member(self.owner, "alice")
        self.bob = self.fx.add_member(self.owner, "bob")

    def connect(self, peer, session_id, **kwargs):
        """
        A new session of C{peer}; returns C{(ack, session, connection)}.
        """
        ack = peer.connect(session_id=session_id, **kwargs)
        return ack, peer.session, peer.connection

    def watch(self, peer, session_id="ui"):
        """
        A watching session of C{peer} with a session key.
        """
        ack, session, connection = self.connect(peer, session_id, session_key=True, watch=True)
        key = peer.session_identity
        peer.session_identity = None
        return ack, session, connection, key

    def use(self, peer, session, connection):
        peer.session, peer.connection = session, connection

    def dm(self, sender, target, text=b"hi"):
        nonce, ciphertext = crypto.encrypt_direct(sender.identity, target, text)
        return sender.request({"type": "send", "targetSpec": target, "nonce": nonce,
                               "ciphertext": ciphertext})


class WatchPresenceTests(WatchTestCase):
    def test_hello_ack_says_watch(self):
        """A watching hello is acknowledged with watch:true; a plain one without it."""
        plain, _, _ = self.connect(self.bob, "b1")
        self.assertNotIn("watch", plain)
        ack, _, _, _ = self.watch(self.alice)
        self.assertIs(ack["watch"], True)

    def test_watcher_is_not_announced_nor_listed(self):
        """Others get no presence event for a watcher, do not list it; its member stays offline."""
        _, bob_session, bob_conn = self.connect(self.bob, "b1")
        _, watcher, watcher_conn, _ = self.watch(self.alice)
        self.assertEqual(bob_conn.events(), [])
        self.use(self.bob, bob_session, bob_conn)
        peers = self.bob.request({"type": "list_peers"})["peers"]
        self.assertEqual([p["displayName"] for p in peers], ["bob"])
        members = {m["name"]: m["online"]
                   for m in self.bob.request({"type": "list_members"})["members"]}
        self.assertFalse(members["alice"])
        self.assertTrue(members["bob"])
        self.use(self.alice, watcher, watcher_conn)
        self.alice.leave()
        self.assertEqual(bob_conn.events(), [])

    def test_watcher_hears_presence_of_everyone(self):
        """A watcher hears sessions of other members and of its own member come and go."""
        _, _, watcher_conn, _ = self.watch(self.alice)
        _, bob_session, bob_conn = self.connect(self.bob, "b1")
        _, own_session, own_conn = self.connect(self.alice, "claude-1")
        self.assertEqual([(e["event"], e["eventData"]["name"]) for e in watcher_conn.events()],
                         [("peer_joined", "bob"), ("peer_joined", "alice")])
        self.use(self.alice, own_session, own_conn)
        self.alice.leave()
        self.assertEqual(watcher_conn.events()[-1]["event"], "peer_left")
        # The member's own other sessions never hear about each other.
        self.assertEqual(own_conn.events("peer_joined"), [])

    def test_watcher_lists_everyone_with_status_source_and_age(self):
        """A watcher's list_peers shows every peer (with status source and time) and itself."""
        _, bob_session, bob_conn = self.connect(self.bob, "b1")
        _, watcher, watcher_conn, key = self.watch(self.alice)
        self.use(self.alice, watcher, watcher_conn)
        peers = self.alice.request({"type": "list_peers"})["peers"]
        self.assertEqual([p["sessionId"] for p in peers], ["b1", "ui"])
        bob_row = peers[0]
        self.assertEqual(bob_row["statusSource"], "jsonl")
        self.assertTrue(bob_row["statusUpdatedAt"].endswith("Z"))

    def test_status_summary_and_group_changes_reach_watchers_only(self):
        """peer_status events go to watchers when a peer's status, summary or groups change."""
        _, _, watcher_conn, _ = self.watch(self.alice)
        _, _, owner_conn = self.connect(self.owner, "o1")
        _, bob_session, bob_conn = self.connect(self.bob, "b1")
        self.bob.request({"type": "set_status", "status": "working"})
        self.bob.request({"type": "set_summary", "summary": "fixing <b>it</b>"})
        self.bob.request({"type": "join_group", "name": "ops"})
        changes = [e["eventData"] for e in watcher_conn.events("peer_status")]
        self.assertEqual([(c["status"], c["statusSource"], c["summary"],
                           [g["name"] for g in c["groups"]]) for c in changes],
                         [("working", "manual", None, []),
                          ("working", "manual", "fixing <b>it</b>", []),
                          ("working", "manual", "fixing <b>it</b>", ["ops"])])
        self.assertEqual(changes[0]["sessionId"], "b1")
        self.assertEqual(owner_conn.events("peer_status"), [])
        self.assertEqual(bob_conn.events("peer_status"), [])

    def test_status_decay_reaches_watchers(self):
        """working decaying to idle after the TTL is a peer_status event too."""
        _, _, watcher_conn, _ = self.watch(self.alice)
        self.connect(self.bob, "b1")
        self.bob.request({"type": "set_status", "status": "working", "source": "jsonl"})
        self.fx.advance(self.fx.settings.status_ttl_seconds + 20)
        statuses = [e["eventData"]["status"] for e in watcher_conn.events("peer_status")]
        self.assertEqual(statuses, ["working", "idle"])

    def test_all_my_sessions_leaves_the_watcher_alone(self):
        """set_status all:true from the member's CLI does not change its watcher's status."""
        _, watcher, watcher_conn, _ = self.watch(self.alice)
        self.connect(self.alice, "cli-1", receive=False)
        self.alice.request({"type": "set_status", "status": "dnd", "all": True})
        self.assertEqual(watcher.status.status, "idle")


class WatchDeliveryTests(WatchTestCase):
    def test_member_dm_goes_to_the_claude_session(self):
        """A DM to the member key goes to its regular session, never to the watcher."""
        _, _, watcher_conn, _ = self.watch(self.alice)
        _, claude, claude_conn = self.connect(self.alice, "claude-1")
        self.connect(self.bob, "b1")
        self.assertTrue(self.dm(self.bob, self.alice.pubkey)["queued"])
        self.assertEqual(len(claude_conn.messages()), 1)
        self.assertEqual(watcher_conn.messages(), [])

    def test_member_dm_waits_for_a_claude_session(self):
        """With only the watcher live, a DM to the member stays queued for its next real session."""
        _, _, watcher_conn, _ = self.watch(self.alice)
        self.connect(self.bob, "b1")
        ack = self.dm(self.bob, self.alice.pubkey)
        self.assertTrue(ack["queued"])
        self.fx.advance(40)  # past a lease: nothing claims it for the watcher either
        self.assertEqual(watcher_conn.messages(), [])
        _, _, claude_conn = self.connect(self.alice, "claude-1")
        self.assertEqual([m["messageId"] for m in claude_conn.messages()], [ack["messageId"]])

    def test_broadcast_skips_a_member_only_watching(self):
        """A broadcast makes no delivery for a member whose only session watches."""
        _, _, watcher_conn, _ = self.watch(self.alice)
        _, _, bob_conn = self.connect(self.bob, "b1")
        self.connect(self.owner, "o1")
        nonce, ciphertext = crypto.encrypt_broadcast(b"k" * 32, b"all hands")
        ack = self.owner.request({"type": "send", "targetSpec": "*", "nonce": nonce,
                                  "ciphertext": ciphertext})
        self.assertTrue(ack["queued"])
        status = self.owner.request({"type": "message_status", "messageId": ack["messageId"]})
        self.assertEqual([r["name"] for r in status["recipients"]], ["bob"])
        self.assertEqual(len(bob_conn.messages()), 1)
        self.assertEqual(watcher_conn.messages(), [])

    def test_session_key_dm_reaches_the_watcher(self):
        """A DM to the watcher's session key is pushed to it (a reply to what the page sent)."""
        _, _, watcher_conn, key = self.watch(self.alice)
        self.connect(self.bob, "b1")
        ack = self.dm(self.bob, key.pubkey, b"answer")
        self.assertTrue(ack["queued"])
        [push] = watcher_conn.messages()
        self.assertEqual(push["targetSpec"], key.pubkey)
        self.assertEqual(crypto.decrypt_direct(key, push["senderPubkey"], push["nonce"],
                                               push["ciphertext"]), b"answer")

    def test_watcher_reconnecting_claims_its_own_messages_only(self):
        """A returning watcher claims its session-key messages and leaves its member's queued."""
        _, watcher, watcher_conn, key = self.watch(self.alice)
        self.use(self.alice, watcher, watcher_conn)
        self.alice.drop()
        self.connect(self.bob, "b1")
        to_watcher = self.dm(self.bob, key.pubkey, b"for the page")
        to_member = self.dm(self.bob, self.alice.pubkey, b"for claude")
        self.alice.session_identity = key
        _, _, again = self.connect(self.alice, "ui", session_key=True, watch=True)
        self.alice.session_identity = None
        self.assertEqual([m["messageId"] for m in again.messages()], [to_watcher["messageId"]])
        _, _, claude_conn = self.connect(self.alice, "claude-1")
        self.assertEqual([m["messageId"] for m in claude_conn.messages()],
                         [to_member["messageId"]])

    def test_watcher_ack_confirms_nothing_of_its_member(self):
        """A watcher's client_ack of a member delivery it never got leaves it queued."""
        _, watcher, watcher_conn, _ = self.watch(self.alice)
        self.connect(self.bob, "b1")
        ack = self.dm(self.bob, self.alice.pubkey)
        self.use(self.alice, watcher, watcher_conn)
        self.alice.request({"type": "client_ack", "messageId": ack["messageId"]})
        self.fx.flush()
        status = self.bob.request({"type": "message_status", "messageId": ack["messageId"]})
        self.assertEqual([r["status"] for r in status["recipients"]], ["queued"])

    def test_hook_never_matches_a_watcher(self):
        """A hook report by cwd lands on the Claude Code session, not on a watcher there too."""
        _, watcher, _, _ = self.watch(self.alice)
        _, claude, _ = self.connect(self.alice, "claude-1")
        # Both say hello from the same folder; the watcher is the newer one.
        claude.connected_at -= 1000
        cwd = watcher.cwd
        self.assertEqual(cwd, claude.cwd)
        body = ('{"cwd": "%s", "pid": 0, "status": "working", "session_id": ""}'
                % (cwd,)).encode("utf-8")
        now = self.fx.now_ms()
        signature = self.alice.identity.sign(
            crypto.hook_string(self.alice.mesh.id, now, body))
        result = result_of(self.fx.broker.hooks.report(
            self.alice.mesh.id, self.alice.pubkey, str(now), signature, body))
        self.assertEqual(result["presence_id"], claude.presence_id)
        self.assertEqual(watcher.status.status, "idle")
