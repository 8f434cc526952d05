"""
The long fault, flood and hostile-input runs of issue 8:

    python -m soak [--only crash|outage|slow|flood|fuzz ...] [--fuzz-examples N]
                   [--rounds N] [--out report.json]

Each run starts its own broker process (and Postgres cluster for the outage)
in a temporary directory, prints its figures and whether its checks held,
and cleans up. The exit status is 1 when a check failed. C{make soak} runs
every scenario once (a few minutes); C{make fuzz} runs the hypothesis suite
of tests/test_fuzz.py with many examples.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer

from soak import scenarios
from soak.harness import find_initdb

# RSS a slow consumer may leave behind in the broker (its buffers are freed).
SLOW_CONSUMER_RSS_SLACK_KB = 32 * 1024


def _check_crash(f):
    return {"nothing acknowledged lost": not f["lost"],
            "nothing delivered that was neither acknowledged nor in flight": not f["phantom"],
            "nothing answered queued:false delivered": not f["refused_delivered"]}


def _check_outage(f):
    return {"ready 200 before, 503 during (health says db down)":
            f["ready_before"] == 200 and tuple(f["health_during"]) == (200, "down"),
            "sends refused store_unavailable during the outage":
            f["refused_store_unavailable"] > 0 and not f["refused_other"],
            "no false queued:true": not f["false_queued"],
            "nothing acknowledged lost": not f["lost"],
            "recovered without a restart": f["recovered_sends"] and f["same_process"]}


def _check_slow(f):
    return {"closed while flooded": f["closed_while_flooding"],
            "closed with 4003 (or dropped after its close handshake)":
            f["close"][1] in (4003, 1006),
            "its deliveries stayed queued": not f["lost"],
            "memory back within %d MiB" % (SLOW_CONSUMER_RSS_SLACK_KB // 1024):
            f["rss_after_kb"] - f["rss_before_kb"] < SLOW_CONSUMER_RSS_SLACK_KB}


def _check_flood(f):
    return {"upgrade flood met 429s": f["upgrades"].get("429", 0) > 0,
            "send flood met rate_limit": f["send_flood"]["acks"].get("rate_limit", 0) > 0,
            # Each flooding connection is closed 1008 (under full load a close
            # handshake may time out: dropped); while its address is
            # penalised, the flooder's reconnections are refused (429).
            "error flood closed 1008, then refused (99% at least, the rest dropped)":
            f["error_flood"]["closes"].get("1008 flood", 0) >= 1 and
            f["error_flood"]["closes"].get("1008 flood", 0)
            + f["error_flood"]["closes"].get("refused", 0) >= 0.99 * f["error_flood"]["rounds"],
            "unaffected peers got every message":
            f["during_arrived"] == f["baseline_arrived"] == f["probe_messages"],
            "broker still serving": f["broker_health"] == 200 and f["broker_running"],
            "unaffected p99 within 2x baseline":
            f["during_p99_ms"] <= 2 * f["baseline_p99_ms"]}


SCENARIOS = {
    "crash": (lambda r, d, a: scenarios.crash_run(
        r, d, messages=100_000, kill_after=a.crash_kill_after, chunk=100), _check_crash),
    "outage": (lambda r, d, a: scenarios.outage_run(
        r, d, pace=0.02, before=3.0, outage=10.0, after=3.0), _check_outage),
    "slow": (lambda r, d, a: scenarios.slow_consumer_run(r, d), _check_slow),
    "flood": (lambda r, d, a: scenarios.flood_run(
        r, d, probe_messages=a.probe_messages, probe_pace=0.05, pin=True), _check_flood),
}


def run_fuzz(examples):
    env = dict(os.environ, CLAUDEMESH_FUZZ_EXAMPLES=str(examples))
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "twisted.trial", "tests.test_fuzz"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail = result.stdout.decode("utf-8", "replace").strip().splitlines()[-3:]
    figures = {"examples_per_test": examples, "seconds": round(time.time() - started, 1),
               "trial": tail}
    return figures, {"no failing example": result.returncode == 0}


@defer.inlineCallbacks
def _run(reactor, args, report):
    for name in args.only:
        if name == "fuzz":
            continue
        if name == "outage" and find_initdb() is None:
            report[name] = {"skipped": "initdb not found"}
            continue
        run, check = SCENARIOS[name]
        for round_ in range(args.rounds if name == "crash" else 1):
            workdir = tempfile.mkdtemp(prefix="claudemesh-soak-%s-" % (name,))
            key = name if args.rounds == 1 or name != "crash" else "%s-%d" % (name, round_ + 1)
            started = reactor.seconds()
            sys.stderr.write("soak: %s ...\n" % (key,))
            try:
                figures = yield run(reactor, workdir, args)
            except Exception as e:
                report[key] = {"error": repr(e), "workdir": workdir,
                               "checks": {"ran": False}}
                continue
            figures["seconds"] = round(reactor.seconds() - started, 1)
            report[key] = dict(figures, checks=check(figures))
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS) + ["fuzz"],
                        help="run only this scenario (repeatable)")
    parser.add_argument("--fuzz-examples", type=int, default=0,
                        help="also run tests/test_fuzz.py with N examples per test")
    parser.add_argument("--rounds", type=int, default=3, help="crash rounds (default 3)")
    parser.add_argument("--crash-kill-after", type=int, default=2000,
                        help="queued:true acks before the kill -9 (default 2000)")
    parser.add_argument("--probe-messages", type=int, default=400,
                        help="latency probes per flood phase (default 400)")
    parser.add_argument("--out", help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    if not args.only:
        args.only = sorted(SCENARIOS) + (["fuzz"] if args.fuzz_examples else [])
    if "fuzz" in args.only and not args.fuzz_examples:
        args.fuzz_examples = 1000
    report = {}
    if set(args.only) - {"fuzz"}:
        from twisted.internet import reactor as global_reactor

        def go():
            d = _run(global_reactor, args, report)
            d.addBoth(lambda _: global_reactor.stop())

        global_reactor.callWhenRunning(go)
        global_reactor.run()
    if "fuzz" in args.only:
        sys.stderr.write("soak: fuzz (%d examples per test) ...\n" % (args.fuzz_examples,))
        figures, checks = run_fuzz(args.fuzz_examples)
        report["fuzz"] = dict(figures, checks=checks)
    text = json.dumps(report, indent=2, sort_keys=True)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    failed = [(name, check) for name, figures in report.items()
              for check, ok in figures.get("checks", {}).items() if not ok]
    for name, check in failed:
        sys.stderr.write("soak: FAILED %s: %s\n" % (name, check))
    if not failed:
        sys.stderr.write("soak: every check held\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
