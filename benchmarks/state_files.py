"""Checkpoint files under faults and their memory: SIGKILLs during saves, and the peak memory of a save and a load.

Two parts, each in fresh child processes so that one's memory does not blur another's:

- ``kills``: ``--kills`` times, a child builds an Adam state of ``--state-mib`` MiB (``--buffers`` buffers
  of equal size: ``--buffers / 2`` float32 params, m and v each), saves it once (that save removes the temp
  files earlier kills left), reports the temp files of the target's pattern
  (``.<name>.<12 hex>.tmp``) still there, then saves in a loop and is killed (SIGKILL) at a random moment
  within about two saves.  After each kill the target must load whole; after the last kill one more save
  runs and the temp files left are counted.  Figures: temp files (and bytes) seen after the kills, and the
  temp files left after the next save (the goal: none).
- ``memory``: a child builds the state, resets its peak RSS (``/proc/self/clear_refs``, 5), saves, and
  reads the peak (VmHWM) less the RSS before the save: the save's extra memory, also as a ratio to the
  largest buffer (the goal: <= 1.2).  Then a child loads that file into a new Adam (with the params) and
  reports the peak less the RSS before the load less the state's bytes: the load's extra memory.  Run for
  each layout of ``--layouts`` (buffers of the state), ``--repeat`` times each.

It uses only ``opt.save`` / ``opt.load``, so pointing PYTHONPATH at another tree of xopt measures that one.
Linux only (``/proc``).  Writes JSON with --out (the command included).

    python benchmarks/state_files.py [--state-mib 512] [--kills 30] [--layouts 8,2] [--repeat 3]
                                     [--dir DIR] [--out FILE] [--seed 0] [--note TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

STATE = """
import os, sys, time
import numpy as np
import xopt

def state(total_bytes, buffers):
    n = total_bytes // buffers // 4  # float32 elements per buffer
    params = {f"W{i}": np.zeros(n, np.float32) for i in range(buffers // 2)}
    opt = xopt.Adam()
    grads = {k: np.full(n, 0.5, np.float32) for k in params}
    opt.update(params, grads)
    del grads
    return opt, params

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
"""

KILLED = STATE + """
opt, params = state(int(sys.argv[2]), int(sys.argv[3]))
t0 = time.perf_counter()
opt.save(sys.argv[1])
print("saved", time.perf_counter() - t0, flush=True)
sys.stdin.readline()
print("saving", flush=True)
while True:
    opt.save(sys.argv[1])
"""

MEMORY = STATE + """
import json
path, total, buffers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
opt, params = state(total, buffers)
if sys.argv[4] == "save":
    opt.save(path)  # a first save: imports and first-time costs out of the figure
    reset_peak()
    before = status("VmRSS")
    t0 = time.perf_counter()
    opt.save(path)
    seconds = time.perf_counter() - t0
    extra = status("VmHWM") - before
else:
    opt = xopt.Adam()
    reset_peak()
    before = status("VmRSS")
    t0 = time.perf_counter()
    opt.load(path, params=params)
    seconds = time.perf_counter() - t0
    extra = status("VmHWM") - before - sum(b.nbytes for st in opt.state.values() for k, b in st.items()
                                           if k != "step")
print(json.dumps({"extra_bytes": extra, "seconds": seconds, "xopt": xopt.__file__}))
"""


def _run(code, *args, **kwargs):
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], **kwargs)


def temp_files(path):
    directory, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(f".{base}.") + r"[0-9a-f]{12}\.tmp\Z")
    return {n: os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory) if pattern.match(n)}


def kills(path, total, buffers, count, rng):
    rounds, left_at_start = [], []
    for k in range(count):
        child = _run(KILLED, path, total, buffers, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = child.stdout.readline().split()
        assert line and line[0] == "saved", line
        save_s = float(line[1])
        left_at_start.append(len(temp_files(path)))  # after a whole save, with none running
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "saving"
        delay = float(rng.uniform(0.0, 2.0 * save_s))
        time.sleep(delay)
        child.kill()
        child.wait()
        child.stdout.close()
        child.stdin.close()
        left = temp_files(path)
        check = subprocess.run([sys.executable, "-c", "import sys, xopt; s = xopt.load_state(sys.argv[1]); "
                                "print(s['iter'], len(s['state']))", path], capture_output=True, text=True)
        rounds.append({"save_seconds": save_s, "killed_after_s": delay, "temp_files": len(left),
                       "temp_bytes": sum(left.values()), "loads": check.returncode == 0,
                       "loaded": check.stdout.strip()})
        print(f"kill {k + 1:2d}: after {delay:.2f} s (a save takes {save_s:.2f} s): {len(left)} temp file(s), "
              f"{sum(left.values()) / 2**20:.0f} MiB; the file loads: {check.returncode == 0}", flush=True)
    final = subprocess.run([sys.executable, "-c", KILLED.replace("sys.stdin.readline()", "sys.exit(0)"), path,
                            str(total), str(buffers)], capture_output=True, text=True)
    after = temp_files(path)
    return {"rounds": rounds, "kills_leaving_temp_files": sum(r["temp_files"] > 0 for r in rounds),
            "temp_files_at_each_next_save": left_at_start[1:], "all_loaded": all(r["loads"] for r in rounds),
            "final_save_ok": final.returncode == 0, "temp_files_after_next_save": len(after)}


def memory(path, total, buffers, repeat):
    largest = total // buffers // 4 * 4
    rows = {}
    for what in ("save", "load"):
        runs = []
        for _ in range(repeat):
            out = subprocess.run([sys.executable, "-c", MEMORY, path, str(total), str(buffers), what],
                                 capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        extra = [r["extra_bytes"] for r in runs]
        rows[what] = {"extra_bytes": extra, "extra_mib_max": max(extra) / 2**20,
                      "ratio_to_largest_buffer_max": max(extra) / largest,
                      "seconds": [r["seconds"] for r in runs], "xopt": runs[0]["xopt"]}
        print(f"{buffers} buffers of {largest / 2**20:.0f} MiB, {what}: extra memory {max(extra) / 2**20:.1f} MiB "
              f"(max of {repeat}), {max(extra) / largest:.2f}x the largest buffer", flush=True)
    return {"buffers": buffers, "largest_buffer_bytes": largest, **rows}


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--state-mib", type=int, default=512)
    ap.add_argument("--buffers", type=int, default=8, help="buffers of the killed saves' state")
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--layouts", default="8,2", help="buffer counts of the memory part's states")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    ap.add_argument("--note", help="a line kept in the JSON (which tree of xopt was measured, say)")
    args = ap.parse_args(argv)
    total = args.state_mib * 2**20
    rng = np.random.default_rng(args.seed)
    result = {"command": "python benchmarks/state_files.py " + " ".join(argv), "machine": platform.machine(),
              "cpus": os.cpu_count(), "python": sys.version.split()[0], "state_bytes": total, "note": args.note}
    try:
        from xopt.bench.report import commit

        result["commit"] = commit()
    except ImportError:
        result["commit"] = "unknown"
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "ckpt.npz")
        if args.kills:
            result["kills"] = kills(path, total, args.buffers, args.kills, rng)
            k = result["kills"]
            print(f"{args.kills} kills: {k['kills_leaving_temp_files']} left temp files; after the next save "
                  f"{k['temp_files_after_next_save']} temp file(s) left; every file loaded: {k['all_loaded']}")
        result["memory"] = [memory(os.path.join(tmp, f"mem{b}.npz"), total, b, args.repeat)
                            for b in map(int, args.layouts.split(","))]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
