"""
A Unix socket server in a thread, for tests that play the other end of a
local socket: Claude Code's inbox socket (it keeps what each connection
sent until it closed) or an MCP server's local socket (it answers the first
line). Stopped by L{UnixSocketServer.close}; tests add that as a cleanup.
"""

import json
import socket
import threading


class UnixSocketServer:
    """
    @ivar received: the bytes of each finished connection, in order.
    @ivar answer: when not C{None}, read one line per connection, reply
        with this object as a JSON line, and close.
    """

    def __init__(self, path, answer=None):
        self.path = path
        self.answer = answer
        self.received = []
        self.listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listening.bind(path)
        self.listening.listen(8)
        self.listening.settimeout(0.2)
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def requests(self):
        return [json.loads(data) for data in self.received]

    def _serve(self):
        while self.running:
            try:
                conn, _ = self.listening.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                read = True
                try:
                    while not (self.answer is not None and data.endswith(b"\n")):
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                except OSError:
                    read = False
                # Recorded before the reply: the client may act on the reply
                # (and its test look at what was received) at once.
                self.received.append(data)
                if read and self.answer is not None:
                    try:
                        conn.sendall(json.dumps(self.answer).encode("utf-8") + b"\n")
                    except OSError:
                        pass

    def close(self):
        self.running = False
        self.thread.join(5)
        self.listening.close()
