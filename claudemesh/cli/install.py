"""
C{claudemesh install [--no-hooks]} and C{claudemesh uninstall}: register
(and remove) the MCP server and the status hooks with Claude Code.

- C{~/.claude.json}: C{mcpServers.claudemesh = {command, args: [..., "mcp"]}};
- C{~/.claude/settings.json}: C{hooks.UserPromptSubmit} runs
  C{claudemesh hook working}, C{hooks.Stop} runs C{claudemesh hook idle}.

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

from claudemesh.cli.main import EXIT_FAILURE, EXIT_OK
from claudemesh.client.config import atomic_write

SERVER_NAME = "claudemesh"
HOOKS = (("UserPromptSubmit", "working"), ("Stop", "idle"))
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


def hook_command(status, argv=None):
    argv = argv or claudemesh_argv()
    return " ".join(shlex.quote(a) for a in argv + ["hook", status])


def is_our_hook(command):
    """
    Is C{command} a C{claudemesh hook <status>} command (any install path)?
    """
    if not isinstance(command, str):
        return False
    try:
        words = shlex.split(command)
    except ValueError:
        return False
    if len(words) < 3 or words[-2] != "hook" or words[-1] not in HOOK_STATUSES:
        return False
    head = words[:-2]
    return os.path.basename(head[0]) == "claudemesh" or (
        len(head) >= 3 and head[-2] == "-m" and head[-1] == "claudemesh.cli.main")


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
    Register the two hooks; returns C{(added, present)} counts. An older
    claudemesh hook of the same status (another install path) is updated in
    place rather than doubled.
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
                 and shlex.split(h["command"])[-1] == status]
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


# -- what the other commands ask ----------------------------------------------------------


def mcp_registered(environ):
    servers = read_json(claude_json_path(environ)).get("mcpServers")
    entry = servers.get(SERVER_NAME) if isinstance(servers, dict) else None
    return isinstance(entry, dict) and "mcp" in (entry.get("args") or [])


def hooks_registered(environ):
    """
    The statuses (C{working}, C{idle}) whose claudemesh hook is registered
    on its event.
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
            if is_our_hook(command) and shlex.split(command)[-1] == status:
                found.add(status)
    return found


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
        (added, present), backup, _ = _update(path, lambda d: add_hooks(d, argv), environ)
        out("✓ Hooks registered (UserPromptSubmit → working, Stop → idle) in %s: %d added, "
            "%d already present%s" % (short(path, environ), added, present,
                                      " (backup: %s)" % (short(backup, environ),)
                                      if backup else ""))
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
    count, backup, _ = _update(path, remove_hooks, environ)
    if count:
        out("✓ %d claudemesh hook(s) removed from %s (backup: %s)" % (
            count, short(path, environ), short(backup, environ)))
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
