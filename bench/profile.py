"""
Summaries of ``py-spy record --format raw`` output (collapsed stacks: one
``frame;frame;...;leaf count`` per line).
"""

import collections
import re

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(frame):
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return "%s (%s)" % (match.group("func"), path)


def summarise(path, top=25):
    """
    Self and inclusive sample counts per function, for the main thread
    (the reactor) and overall.
    """
    total = 0
    self_counts = collections.Counter()
    inclusive = collections.Counter()
    threads = collections.Counter()
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            try:
                count = int(count)
            except ValueError:
                continue
            frames = stack.split(";")
            thread = frames[0] if frames and frames[0].startswith(("thread", "process")) else ""
            if frames and frames[0].startswith("process"):
                frames = frames[1:]
                thread = frames[0] if frames and frames[0].startswith("thread") else thread
            if frames and frames[0].startswith("thread"):
                frames = frames[1:]
            total += count
            threads[thread] += count
            if not frames:
                continue
            self_counts[_short(frames[-1])] += count
            for name in {_short(fr) for fr in frames}:
                inclusive[name] += count

    def table(counter):
        return [{"frame": name, "samples": n, "pct": 100.0 * n / total if total else 0.0}
                for name, n in counter.most_common(top)]

    return {"samples": total, "threads": {k: v for k, v in threads.most_common()},
            "self": table(self_counts), "inclusive": table(inclusive)}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(summarise(sys.argv[1]), indent=2))
