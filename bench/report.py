"""
The table ``python -m bench`` prints.
"""

COLUMNS = (
    ("scenario", 11), ("target", 7), ("deliv%", 7), ("rate/s", 9), ("unit", 8),
    ("ack p50/p95/p99/max ms", 27), ("push p50/p95/p99/max ms", 27),
    ("µs/msg", 7), ("s/1k", 6), ("peakMB", 7), ("gen cpu", 7), ("x relay", 7),
    ("cpu x relay", 11),
)

UNITS = {"burst": "msg", "steady": "msg", "fanout": "push", "connections": "hello",
         "growth": "msg"}
TARGETS = ("broker", "seeded", "nodes", "workers", "relay")
# The ratio lines: figure key -> label.
RATIO_LABELS = (("rate", "rate"), ("cpu_per_msg", "CPU/msg"), ("p99", "p99"),
                ("peak_rss", "peak RSS"), ("rss_per_conn", "RSS/conn"))


def _pct(stats):
    if not stats:
        return "-"
    return "%s/%s/%s/%s" % tuple(_ms(stats[k]) for k in ("p50", "p95", "p99", "max"))


def _ms(value):
    if value >= 100:
        return "%.0f" % value
    if value >= 10:
        return "%.1f" % value
    return "%.2f" % value


def _times(value):
    return "%.2f" % value if value is not None else "-"


def row(name, target, result, ratio, cpu_ratio=None):
    if name == "connections":
        delivered = "%.1f" % (100.0 * result["connected"] / result["peers"])
        ack = _pct(result.get("connect_to_hello_ack_ms"))
        push = "rss %.1f KB/conn" % (result["rss_per_connection_kb"] or 0)
    else:
        delivered = "%.2f" % result["delivered_pct"]
        ack = _pct(result.get("send_to_ack_ms"))
        push = _pct(result.get("send_to_push_ms"))
    per_1000 = result.get("broker_cpu_s_per_1000")
    if name == "fanout":
        # per push, not per broadcast
        pushes = result.get("pushes") or 0
        micro = 1e6 * result["broker_cpu_s"] / pushes if pushes else None
    else:
        micro = per_1000 * 1000 if per_1000 is not None else None
    return [
        name, target, delivered, "%.0f" % result["throughput_per_s"], UNITS[name], ack, push,
        "%.0f" % micro if micro is not None else "-",
        "%.3f" % per_1000 if per_1000 is not None else "-",
        "%.0f" % (result["broker_peak_rss_kb"] / 1024.0),
        "%.1f" % result["generator_cpu_s"],
        _times(ratio) if target != "relay" else "",
        _times(cpu_ratio) if target != "relay" else "",
    ]


def print_table(document):
    print()
    print("claudemesh bench — %s%s, store %s%s, %s CPUs" % (
        document["sha"], " (dirty)" if document.get("dirty") else "", document["store"],
        ", --quick" if document.get("quick") else "", document["machine"]["cpus"]))
    print("  ".join(title.ljust(width) for title, width in COLUMNS))
    for name, entry in document["scenarios"].items():
        for target in TARGETS:
            result = entry.get(target)
            if result is None:
                continue
            mine = entry.get("ratios", {}).get(target, {})
            cells = row(name, target, result, mine.get("rate"), mine.get("cpu_per_msg"))
            print("  ".join(str(c).ljust(w) for c, (_, w) in zip(cells, COLUMNS)))
    notes = []
    for name, entry in document["scenarios"].items():
        b = entry.get("broker")
        if not b:
            continue
        seeded = entry.get("seeded")
        if seeded:
            notes.append("%s: seeded %d delivered + %d queued messages in %.1f s; sent %d, "
                         "lost %d, duplicates to app %d" % (
                             name, seeded["seeded_delivered"], seeded["seeded_queued"],
                             seeded["seed_s"], seeded["sent"], seeded["lost"],
                             seeded["duplicates_to_app"]))
        if name != "connections":
            database = ""
            if b.get("database_cpu_s") is not None and b.get("messages"):
                database = ", Postgres CPU %.1f s (%.0f µs/msg)" % (
                    b["database_cpu_s"], 1e6 * b["database_cpu_s"] / b["messages"])
            notes.append("%s: sent %d, lost %d, duplicate pushes %d, duplicates to app %d, "
                         "ack errors %s, broker CPU %.1f s%s, machine busy %.1f s of %.1f s "
                         "wall x %d cores" % (
                             name, b["sent"], b["lost"], b["duplicate_pushes"],
                             b["duplicates_to_app"], b["ack_errors"] or "none",
                             b["broker_cpu_s"], database, b["machine_busy_cpu_s"],
                             b["elapsed_s"], document["machine"]["cpus"]))
        else:
            notes.append("connections: %d/%d connected, %d still open after idle, failures %s, "
                         "RSS %+.0f MB" % (b["connected"], b["peers"], b["still_open"],
                                           b["failures"] or "none", b["rss_growth_kb"] / 1024))
    for name, entry in document["scenarios"].items():
        for target in ("nodes", "workers"):
            result = entry.get(target)
            if result is None:
                continue
            notes.append("%s: %s (%d processes): sent %d, lost %d, duplicates to app %d" % (
                name, target, result.get("processes", 0), result["sent"], result["lost"],
                result["duplicates_to_app"]))
            same = result.get("send_to_push_same_node_ms")
            cross = result.get("send_to_push_cross_node_ms")
            if same and cross:
                notes.append("%s: send->push p50/p99 ms, same node %s/%s, across nodes %s/%s "
                             "(+%s ms p50)" % (name, _ms(same["p50"]), _ms(same["p99"]),
                                               _ms(cross["p50"]), _ms(cross["p99"]),
                                               _ms(cross["p50"] - same["p50"])
                                               if cross["p50"] >= same["p50"] else "0"))
    for name, entry in document["scenarios"].items():
        for target, against in (("broker", "relay"), ("seeded", "relay"),
                                ("nodes_vs_one", "one node"), ("workers_vs_one", "one node"),
                                ("seeded_vs_empty", "the empty database")):
            values = entry.get("ratios", {}).get(target)
            if not values:
                continue
            parts = ["%s %s" % (label, _times(values[key]))
                     for key, label in RATIO_LABELS if values.get(key) is not None]
            who = "seeded" if target.startswith("seeded") else target.split("_")[0] if (
                target.endswith("_vs_one")) else "broker"
            notes.append("%s: %s as x %s: %s" % (name, who, against, ", ".join(parts)))
    for line in notes:
        print("  " + line)
    for key, error in document.get("failures", {}).items():
        print("  FAILED %s: %s" % (key, error.splitlines()[-1] if error else ""))
