"""
C{claudemesh install [--no-hooks]} and C{claudemesh uninstall}: register
(and remove) the MCP server, the hooks and the status line with Claude Code.

- C{~/.claude.json}: C{mcpServers.claudemesh = {command, args: [..., "mcp"]}};
- C{~/.claude/settings.json}: C{hooks.UserPromptSubmit} runs
  C{exec claudemesh hook working}; C{hooks.Stop}, C{hooks.StopFailure} and
  C{hooks.SessionStart} run C{exec claudemesh hook idle}; C{statusLine} runs
  C{exec claudemesh statusline}, only when there is no status line yet
  (otherwise install says how to add it).

Claude Code runs a hook command through C{/bin/sh -c}; C{exec} makes the
hook replace that shell, so its parent is Claude Code itself, the process
whose pid the MCP server knows.

C{~} is C{$HOME}. A file is only written when something changes (so a second
install changes nothing), after a copy to
C{~/.claude/backups/<name>.pre-claudemesh.<ms>}; it is written to a temporary
file and renamed, keeps its mode (new files are 0600) and every key that is
not ours, and is read back to check it. A file that is not a JSON object is
never touched. The command is the absolute path of this C{claudemesh}
(Claude Code may not have the same C{PATH}).

C{uninstall} removes the C{claudemesh} MCP entry and every hook whose command
is C{<…/>claudemesh hook <status>}, and the lists and objects that are left
empty by that; nothing else.
"""

import json
import os
import shlex
import shutil
import sys
import time

from claudemesh.cli.exitcodes import EXIT_FAILURE, EXIT_OK
from claudemesh.client.config import atomic_write

SERVER_NAME = "claudemesh"
HOOKS = (("UserPromptSubmit", "working"), ("Stop", "idle"), ("StopFailure", "idle"),
         ("SessionStart", "idle"))
HOOK_STATUSES = ("idle", "working", "dnd")


class InstallError(Exception):
    """
    A file cannot be used as it is; the message is for the user.
    """


def out(text=""):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def home(environ):
    return environ.get("HOME") or os.path.expanduser("~")


def claude_json_path(environ):
    return os.path.join(home(environ), ".claude.json")


def settings_path(environ):
    return os.path.join(home(environ), ".claude", "settings.json")


def backups_dir(environ):
    return os.path.join(home(environ), ".claude", "backups")


def short(path, environ):
    base = home(environ).rstrip("/")
    return "~" + path[len(base):] if base and path.startswith(base + "/") else path


def claudemesh_argv():
    """
    How to run this claudemesh: its console script, else
    C{python -m claudemesh.cli.main}.
    """
    script = os.path.join(os.path.dirname(sys.executable), "claudemesh")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return [os.path.abspath(script)]
    found = shutil.which("claudemesh")
    if found:
        return [os.path.abspath(found)]
    return [os.path.abspath(sys.executable), "-m", "claudemesh.cli.main"]


def mcp_entry(argv=None):
    argv = argv or claudemesh_argv()
    return {"command": argv[0], "args": argv[1:] + ["mcp"]}


def _command(words, argv=None):
    argv = argv or claudemesh_argv()
    return "exec " + " ".join(shlex.quote(a) for a in argv + words)


def hook_command(status, argv=None):
    return _command(["hook", status], argv)


def statusline_command(argv=None):
    return _command(["statusline"], argv)


def _tail_of_ours(command):
    """
    The words after the program in C{[exec] <…/>claudemesh …} or C{[exec]
    <python> -m claudemesh.cli.main …}; C{None} for any other command.
    """
    if not isinstance(command, str):
        return None
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    if words[:1] == ["exec"]:
        words = words[1:]
    if words and os.path.basename(words[0]) == "claudemesh":
        return words[1:]
    if len(words) >= 3 and words[1:3] == ["-m", "claudemesh.cli.main"]:
        return words[3:]
    return None


def is_our_hook(command):
    """
    Is C{command} a C{claudemesh hook <status>} command (any install path,
    with or without C{exec})?
    """
    tail = _tail_of_ours(command)
    return tail is not None and len(tail) == 2 and tail[0] == "hook" and \
        tail[1] in HOOK_STATUSES


def hook_status(command):
    return shlex.split(command)[-1]


def is_our_statusline(value):
    return isinstance(value, dict) and _tail_of_ours(value.get("command")) == ["statusline"]


# -- files -----------------------------------------------------------------------------


def read_json(path):
    """
    The JSON object in C{path}, C{{}} when the file does not exist.

    @raise InstallError: unreadable, not JSON, or not an object.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise InstallError("cannot read %s: %s" % (path, e.strerror or e)) from None
    if not raw.strip():
        return {}
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InstallError("%s is not valid JSON (%s); it was left as it is." % (path, e)) \
            from None
    if not isinstance(document, dict):
        raise InstallError("%s does not hold a JSON object; it was left as it is." % (path,))
    return document


def write_json(path, document, environ):
    """
    Back C{path} up (when it exists), then write C{document} atomically and
    read it back. Returns the backup's path or C{None}.
    """
    backup = None
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    mode = 0o600
    if os.path.exists(path):
        mode = os.stat(path).st_mode & 0o777
        os.makedirs(backups_dir(environ), mode=0o700, exist_ok=True)
        backup = os.path.join(backups_dir(environ), "%s.pre-claudemesh.%d" % (
            os.path.basename(path), int(time.time() * 1000)))
        shutil.copy2(path, backup)
    data = (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    atomic_write(path, data, mode)
    if read_json(path) != document:
        raise InstallError("post-write verification of %s failed; the backup is %s"
                           % (path, backup))
    return backup


# -- the changes, on documents -------------------------------------------------------------


def add_mcp(document, entry):
    """
    Put C{entry} at C{mcpServers.claudemesh}; returns C{added}, C{updated}
    or C{unchanged}.
    """
    servers = document.setdefault("mcpServers", {})
    if not isinstance(servers, dict):
        raise InstallError("'mcpServers' in ~/.claude.json is not an object")
    current = servers.get(SERVER_NAME)
    if isinstance(current, dict) and current.get("command") == entry["command"] and \
            current.get("args") == entry["args"]:
        return "unchanged"
    action = "updated" if current is not None else "added"
    merged = dict(current) if isinstance(current, dict) else {}
    merged.update(entry)
    servers[SERVER_NAME] = merged
    return action


def remove_mcp(document):
    servers = document.get("mcpServers")
    if not isinstance(servers, dict) or SERVER_NAME not in servers:
        return False
    del servers[SERVER_NAME]
    if not servers:
        del document["mcpServers"]
    return True


def _event_groups(document, event, create):
    hooks = document.get("hooks")
    if hooks is None:
        if not create:
            return None
        hooks = document["hooks"] = {}
    if not isinstance(hooks, dict):
        raise InstallError("'hooks' in ~/.claude/settings.json is not an object")
    groups = hooks.get(event)
    if groups is None:
        if not create:
            return None
        groups = hooks[event] = []
    if not isinstance(groups, list):
        raise InstallError("'hooks.%s' in ~/.claude/settings.json is not a list" % (event,))
    return groups


def _commands(groups):
    for group in groups:
        if isinstance(group, dict) and isinstance(group.get("hooks"), list):
            for hook in group["hooks"]:
                if isinstance(hook, dict):
                    yield hook


def add_hooks(document, argv=None):
    """
    Register the hooks; returns C{(added, present)} counts. An older
    claudemesh hook of the same status (another install path, no C{exec})
    is updated in place rather than doubled.
    """
    added = present = 0
    for event, status in HOOKS:
        command = hook_command(status, argv)
        groups = _event_groups(document, event, create=True)
        hooks = list(_commands(groups))
        if any(h.get("command") == command for h in hooks):
            present += 1
            continue
        older = [h for h in hooks if is_our_hook(h.get("command"))
                 and hook_status(h["command"]) == status]
        if older:
            older[0]["command"] = command
        else:
            groups.append({"hooks": [{"type": "command", "command": command}]})
        added += 1
    return added, present


def remove_hooks(document):
    """
    Remove every claudemesh hook, and what that leaves empty; returns how
    many hooks were removed.
    """
    hooks = document.get("hooks")
    if not isinstance(hooks, dict):
        return 0
    removed = 0
    for event in list(hooks):
        groups = hooks[event]
        if not isinstance(groups, list):
            continue
        kept_groups, removed_here = [], 0
        for group in groups:
            if not (isinstance(group, dict) and isinstance(group.get("hooks"), list)):
                kept_groups.append(group)
                continue
            kept = [h for h in group["hooks"]
                    if not (isinstance(h, dict) and is_our_hook(h.get("command")))]
            removed_here += len(group["hooks"]) - len(kept)
            if kept or not group["hooks"]:
                group["hooks"] = kept
                kept_groups.append(group)
        if removed_here:
            removed += removed_here
            if kept_groups:
                hooks[event] = kept_groups
            else:
                del hooks[event]
    if removed and not hooks:
        del document["hooks"]
    return removed


def add_statusline(document, argv=None):
    """
    Set C{statusLine} to ours when there is none; returns C{added},
    C{updated} (ours, from another install path), C{unchanged} or C{other}
    (the user has their own: left alone).
    """
    current = document.get("statusLine")
    wanted = {"type": "command", "command": statusline_command(argv)}
    if current is None:
        document["statusLine"] = wanted
        return "added"
    if current == wanted:
        return "unchanged"
    if is_our_statusline(current):
        current["command"] = wanted["command"]
        return "updated"
    return "other"


def remove_statusline(document):
    if is_our_statusline(document.get("statusLine")):
        del document["statusLine"]
        return True
    return False


# -- what the other commands ask ----------------------------------------------------------


def mcp_registered(environ):
    servers = read_json(claude_json_path(environ)).get("mcpServers")
    entry = servers.get(SERVER_NAME) if isinstance(servers, dict) else None
    return isinstance(entry, dict) and "mcp" in (entry.get("args") or [])


def hooks_registered(environ):
    """
    The events (of L{HOOKS}) whose claudemesh hook is registered.
    """
    document = read_json(settings_path(environ))
    found = set()
    for event, status in HOOKS:
        try:
            groups = _event_groups(document, event, create=False) or []
        except InstallError:
            continue
        for hook in _commands(groups):
            command = hook.get("command")
            if is_our_hook(command) and hook_status(command) == status:
                found.add(event)
    return found


def statusline_registered(environ):
    return is_our_statusline(read_json(settings_path(environ)).get("statusLine"))


# -- the commands -------------------------------------------------------------------------


def _update(path, change, environ):
    """
    Read C{path}, apply C{change(document)}, write it when it changed;
    returns C{(result of change, backup path or None, written)}.
    """
    document = read_json(path)
    before = json.dumps(document, sort_keys=False)
    result = change(document)
    if json.dumps(document, sort_keys=False) == before:
        return result, None, False
    return result, write_json(path, document, environ), True


def install(arguments, environ):
    argv = claudemesh_argv()
    path = claude_json_path(environ)
    action, backup, _ = _update(path, lambda d: add_mcp(d, mcp_entry(argv)), environ)
    out('✓ MCP server "%s" %s in %s%s' % (SERVER_NAME, action, short(path, environ),
                                          " (backup: %s)" % (short(backup, environ),)
                                          if backup else ""))
    if not getattr(arguments, "no_hooks", False):
        path = settings_path(environ)
        ((added, present), line), backup, _ = _update(
            path, lambda d: (add_hooks(d, argv), add_statusline(d, argv)), environ)
        out("✓ Hooks registered (UserPromptSubmit → working; Stop, StopFailure, SessionStart "
            "→ idle) in %s: %d added, %d already present%s" % (
                short(path, environ), added, present,
                " (backup: %s)" % (short(backup, environ),) if backup else ""))
        if line == "other":
            out("• You have a status line already; to show claudemesh in it, add the output of "
                "`%s` to it (it reads the same JSON on stdin)." % (statusline_command(argv)[5:],))
        else:
            out("✓ Status line %s (claudemesh statusline)" % (line,))
    out("⚠ Restart Claude Code for the claudemesh tools to appear.")
    if not _joined(environ):
        out("  Then join a mesh: claudemesh join '<invite link>'  (or: claudemesh new <name>)")
    return EXIT_OK


def _joined(environ):
    from claudemesh.client import config as configuration

    try:
        return bool(configuration.load(configuration.config_dir(environ)).meshes)
    except configuration.ConfigError:
        return True  # someone else's problem to report


def uninstall(arguments, environ):
    path = claude_json_path(environ)
    removed, backup, _ = _update(path, remove_mcp, environ)
    if removed:
        out('✓ MCP server "%s" removed from %s (backup: %s)' % (
            SERVER_NAME, short(path, environ), short(backup, environ)))
    else:
        out('✓ MCP server "%s" was not registered in %s' % (SERVER_NAME, short(path, environ)))
    path = settings_path(environ)
    (count, line), backup, _ = _update(
        path, lambda d: (remove_hooks(d), remove_statusline(d)), environ)
    if count or line:
        out("✓ %d claudemesh hook(s)%s removed from %s (backup: %s)" % (
            count, " and the status line" if line else "", short(path, environ),
            short(backup, environ)))
    else:
        out("✓ No claudemesh hooks in %s" % (short(path, environ),))
    return EXIT_OK


def run(arguments, environ):
    try:
        if arguments.command == "install":
            return install(arguments, environ)
        return uninstall(arguments, environ)
    except InstallError as e:
        sys.stderr.write("claudemesh: %s\n" % (e,))
        return EXIT_FAILURE
    except OSError as e:
        sys.stderr.write("claudemesh: %s\n" % (e,))
        return EXIT_FAILURE
