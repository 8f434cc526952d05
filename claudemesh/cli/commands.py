"""
The C{claudemesh} commands, by name: the table L{claudemesh.cli.main}
dispatches to. The commands themselves live by subject in
L{claudemesh.cli.meshes}, L{claudemesh.cli.messaging} and
L{claudemesh.cli.moderation}; what they share in L{claudemesh.cli.session}
and L{claudemesh.cli.output}.
"""

from twisted.internet import defer

from claudemesh.cli.exitcodes import (
    EXIT_FAILURE,
    EXIT_OK,
)
from claudemesh.cli.meshes import (
    cmd_invite,
    cmd_invites,
    cmd_join,
    cmd_leave,
    cmd_list,
    cmd_new,
    cmd_role,
    cmd_set_broker,
    cmd_use,
    cmd_whoami,
)
from claudemesh.cli.messaging import (
    cmd_inbox,
    cmd_listen,
    cmd_members,
    cmd_peers,
    cmd_send,
    cmd_status,
    cmd_summary,
    group_command,
)
from claudemesh.cli.moderation import (
    DISCONNECT_HINT,
    KICK_HINT,
    cmd_audit,
    cmd_ban,
    cmd_bans,
    cmd_rotate_key,
    cmd_unban,
    removal_command,
)
from claudemesh.cli.output import (
    err,
)
from claudemesh.cli.session import (
    CommandFailed,
    failure_code,
)
from claudemesh.client import config as configuration


def run_local(arguments, environ):
    """
    Run a command that needs no broker; returns the exit code.
    """
    try:
        return LOCAL[arguments.command](arguments, environ)
    except configuration.ConfigError as e:
        err("claudemesh: %s" % (e,))
        return EXIT_FAILURE
    except CommandFailed as e:
        err("claudemesh: %s" % (e.message,))
        return e.code


LOCAL = {"list": cmd_list, "whoami": cmd_whoami, "use": cmd_use}


def run_networked(reactor, arguments, environ):
    """
    The L{task.react} main function: run the command, print a failure, and
    fire with the exit code (as L{SystemExit}).
    """
    handler = NETWORKED[arguments.command]
    d = defer.maybeDeferred(handler, reactor, arguments, environ)
    d.addCallback(lambda code: EXIT_OK if code is None else code)
    d.addErrback(failure_code)

    def finish(code):
        if code:
            raise SystemExit(code)

    return d.addCallback(finish)


def cmd_doctor(reactor, arguments, environ):
    from claudemesh.cli import doctor

    return doctor.cmd_doctor(reactor, arguments, environ)


NETWORKED = {
    "doctor": cmd_doctor,
    "new": cmd_new,
    "invite": cmd_invite,
    "invites": cmd_invites,
    "join": cmd_join,
    "leave": cmd_leave,
    "role": cmd_role,
    "set-broker": cmd_set_broker,
    "members": cmd_members,
    "join-group": group_command(joining=True),
    "leave-group": group_command(joining=False),
    "peers": cmd_peers,
    "send": cmd_send,
    "inbox": cmd_inbox,
    "listen": cmd_listen,
    "status": cmd_status,
    "summary": cmd_summary,
    "audit": cmd_audit,
    "disconnect": removal_command("disconnect", "Disconnected", DISCONNECT_HINT),
    "kick": removal_command("kick", "Kicked", KICK_HINT),
    "ban": cmd_ban,
    "rotate-key": cmd_rotate_key,
    "unban": cmd_unban,
    "bans": cmd_bans,
}
