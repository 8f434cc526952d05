"""
How long Claude Code waits for claudemesh's hook and status line commands
(docs/claude-code.md): C{python -m bench.hooks [--runs N]}.

It makes a config with one mesh whose broker is down (a closed port),
starts C{claudemesh mcp} as a child of this process (so this process plays
Claude Code: the commands find that server's local socket through their
parent), then runs, N times each, as Claude Code does (C{/bin/sh -c
"exec …"}, the hook's JSON on stdin):

- C{python -c pass}, for scale;
- C{claudemesh hook working} for C{UserPromptSubmit}, answered by the MCP
  server (which posts the status to the dead broker afterwards, in the
  background);
- C{claudemesh statusline};
- C{claudemesh hook working} with no MCP server (it posts itself: the
  connection is refused).

Prints the median and the minimum wall time of each, and the mean CPU time
(user + system, the command and its children), in milliseconds.
"""

import argparse
import json
import os
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from claudemesh import crypto


def claudemesh_command():
    script = os.path.join(os.path.dirname(sys.executable), "claudemesh")
    return [script] if os.path.exists(script) else [sys.executable, "-m",
                                                    "claudemesh.cli.main"]


def dead_broker():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return "ws://127.0.0.1:%d/ws" % (port,)


def write_config(directory):
    identity = crypto.Identity.generate()
    os.makedirs(directory, mode=0o700)
    entry = {"meshId": "m-bench", "memberId": "u-bench", "slug": "team", "name": "team",
             "pubkey": identity.pubkey, "secretKey": identity.secret_hex,
             "brokerUrl": dead_broker(), "joinedAt": "2026-01-01T00:00:00.000Z",
             "displayName": "bench"}
    path = os.path.join(directory, "config.json")
    with open(path, "w") as f:
        json.dump({"version": 1, "meshes": [entry]}, f)
    os.chmod(path, 0o600)


def timed(command, env, stdin, runs):
    """
    C{(median wall ms, min wall ms, mean CPU ms)} of C{runs} runs; the CPU
    time (user + system of the command and its children) depends less on
    what else the machine is doing than the wall time.
    """
    timings, cpu = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run(["/bin/sh", "-c", command], input=stdin, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        timings.append((time.perf_counter() - started) * 1000)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append((after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000)
    return statistics.median(timings), min(timings), statistics.mean(cpu)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.hooks")
    parser.add_argument("--runs", type=int, default=50)
    arguments = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="cm-bench-hooks-")
    try:
        env = dict(os.environ, CLAUDEMESH_CONFIG_DIR=os.path.join(tmp, "config"),
                   CLAUDEMESH_RUNTIME_DIR=os.path.join(tmp, "run"), HOME=tmp)
        for key in ("CLAUDE_CODE_MESSAGING_SOCKET", "CLAUDE_CODE_MESSAGING_TOKEN",
                    "CLAUDEMESH_SESSION_ID", "CLAUDEMESH_CHANNELS"):
            env.pop(key, None)
        write_config(env["CLAUDEMESH_CONFIG_DIR"])
        cm = " ".join(shlex.quote(a) for a in claudemesh_command())
        payload = json.dumps({"hook_event_name": "UserPromptSubmit", "session_id": "s",
                              "cwd": tmp, "prompt": "hi"}).encode()
        rows = [("python -c pass", timed(shlex.quote(sys.executable) + " -c pass", env, b"",
                                         arguments.runs))]
        server = subprocess.Popen(claudemesh_command() + ["mcp"], env=env, cwd=tmp,
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            socket_path = os.path.join(env["CLAUDEMESH_RUNTIME_DIR"], "cc-%d.sock"
                                       % (os.getpid(),))
            deadline = time.monotonic() + 30
            while not os.path.exists(socket_path) and time.monotonic() < deadline:
                time.sleep(0.1)
            rows.append(("hook, MCP server answers, broker down",
                         timed("exec %s hook working" % (cm,), env, payload, arguments.runs)))
            rows.append(("statusline, MCP server answers",
                         timed("exec %s statusline" % (cm,), env, b"{}", arguments.runs)))
        finally:
            server.stdin.close()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        rows.append(("hook, no MCP server, broker refuses",
                     timed("exec %s hook working" % (cm,), env, payload, arguments.runs)))
        print("%-42s %10s %10s %10s" % ("case (%d runs each)" % (arguments.runs,), "median ms",
                                        "min ms", "CPU ms"))
        for name, (median, least, cpu) in rows:
            print("%-42s %10.1f %10.1f %10.1f" % (name, median, least, cpu))
    finally:
        shutil.rmtree(tmp, True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
