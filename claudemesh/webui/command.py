"""
C{claudemesh ui [--mesh M] [--port P] [--no-open]}: serve the page on
127.0.0.1 until Ctrl-C (docs/ui.md).

The URL carries a random token made for this run. The browser is opened on
a small file in the config directory (0600) that forwards to that URL, so
the token does not show in the process list as a browser argument would
(notebook servers do the same).
"""

import os
import re
import secrets
import socket
import sys

from twisted.internet import defer
from twisted.internet.error import CannotListenError

from claudemesh.client import config as configuration
from claudemesh.client import history

EXIT_FAILURE = 1
UI_DIR = "ui"


def ui_session_id():
    """
    The watcher's session id: one per machine and mesh, so its session key
    (kept in the config directory) opens the replies to what the page sent,
    even after a restart.
    """
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname() or "host")[:40]
    return "ui-" + (host or "host")


def open_file(directory, url, port):
    """
    Write the forwarding page for C{url} (0600) and return its path.
    """
    import html

    folder = os.path.join(directory, UI_DIR)
    configuration.ensure_dir(folder)
    path = os.path.join(folder, "open-%d.html" % (port,))
    escaped = html.escape(url, quote=True)
    page = ('<!doctype html><meta charset="utf-8"><meta name="referrer" content="no-referrer">'
            '<meta http-equiv="refresh" content="0;url=%s"><title>claudemesh ui</title>'
            '<p><a href="%s">Open claudemesh ui</a></p>\n' % (escaped, escaped))
    configuration.atomic_write(path, page.encode("utf-8"))
    return path


def make_watch_factory(reactor, directory, environ):
    from claudemesh.webui.watch import MeshWatch

    # Off (CLAUDEMESH_HISTORY=off): the page shows this run's messages only.
    writer = history.from_environ(environ, "ui")
    session_id = ui_session_id()
    display_name = environ.get("CLAUDEMESH_DISPLAY_NAME") or None

    def make_watch(entry):
        watch = MeshWatch(reactor, entry, session_id,
                          session_identity=configuration.session_key(
                              directory, entry.slug, session_id),
                          history=writer, history_reader=writer,
                          display_name=display_name)
        watch.start()
        return watch

    return make_watch


@defer.inlineCallbacks
def serve(reactor, arguments, environ, out=sys.stdout, open_browser=None):
    """
    Listen, print the URL, open the browser, and serve until the reactor
    stops.
    """
    from claudemesh.webui.server import Gate, UIServer

    directory = configuration.config_dir(environ)
    config = configuration.load(directory)
    entry = config.select(arguments.mesh) if arguments.mesh or len(config.meshes) <= 1 \
        else config.meshes[0]
    gate = Gate(secrets.token_urlsafe(32))
    ui = UIServer(reactor, config, gate, make_watch_factory(reactor, directory, environ),
                  default_slug=entry.slug)
    try:
        port = reactor.listenTCP(arguments.port or 0, ui.site(), interface="127.0.0.1")
    except CannotListenError as e:
        sys.stderr.write("claudemesh: cannot listen on 127.0.0.1:%s: %s\n"
                         % (arguments.port, e.socketError))
        raise SystemExit(EXIT_FAILURE) from None
    gate.port = port.getHost().port
    url = "http://127.0.0.1:%d/?token=%s" % (gate.port, gate.token)
    ui.watch_for(entry.slug)
    out.write("claudemesh ui for \"%s\" at\n\n    %s\n\nCtrl-C to stop.\n" % (entry.name, url))
    out.flush()
    if not arguments.no_open:
        path = open_file(directory, url, gate.port)
        opener = open_browser
        if opener is None:
            import webbrowser

            opener = webbrowser.open
        reactor.callInThread(opener, "file://" + path)
    stopped = defer.Deferred()

    @defer.inlineCallbacks
    def shutdown():
        yield ui.stop()
        yield port.stopListening()
        if not stopped.called:
            stopped.callback(None)

    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    yield stopped


def run(arguments, environ):
    """
    The entry point of C{claudemesh ui}: returns the exit code.
    """
    from twisted.internet import task

    try:
        config = configuration.load(configuration.config_dir(environ))
        if arguments.mesh:
            config.select(arguments.mesh)
        elif not config.meshes:
            config.select()
    except configuration.ConfigError as e:
        sys.stderr.write("claudemesh: %s\n" % (e,))
        return EXIT_FAILURE
    try:
        task.react(lambda reactor: serve(reactor, arguments, environ))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_FAILURE
    return 0
