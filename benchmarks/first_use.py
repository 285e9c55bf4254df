"""What a process's first update costs: compiling (cold numba cache) or loading (warm) the CPU kernels.

Each measurement is a fresh Python process that imports xopt and times, in CPU seconds
(``time.process_time``), its import and then its first ``update`` of float32 params (a 1,000- and a
10-element param) for one optimizer; "cold" runs with an empty ``NUMBA_CACHE_DIR``, "warm" with the
cache the cold run left.  With ``--trees A B``, each checkout is measured in turn, interleaved, round after
round (``PYTHONPATH`` set to the tree), so their ratio is from one run; medians over ``--rounds``.

With ``--all-rules``, the "first update" is instead every fused optimizer in float32 and float64, each with a
small, a large (two threads) and a clipped step: what compiling every kernel costs.

With ``--breakdown``, each warm process is split instead: importing numba, setting up its compiler (its
target's registries: what loading a first function from numba's cache does first, SciPy's BLAS probe
included), and then xopt's first update (whether numba was imported by then or not, the update no longer
pays for it); and whether a plain warm first update imports numba at all.

    python benchmarks/first_use.py [--trees . /tmp/old] [--optimizers Adam SGD] [--all-rules | --breakdown]
                                   [--rounds 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

_CHILD = """
import time, sys
c0 = time.process_time()
import numpy as np, xopt
assert xopt.__file__.startswith(sys.argv[2]), xopt.__file__
c1 = time.process_time()
p = {"w": np.ones(1000, np.float32), "b": np.ones(10, np.float32)}
g = {k: np.ones_like(v) for k, v in p.items()}
getattr(xopt, sys.argv[1])().update(p, g)
c2 = time.process_time()
assert p["w"][0] != 1.0
print(c1 - c0, c2 - c1)
"""

_ALL_RULES = """
import time, sys
c0 = time.process_time()
import numpy as np, xopt
assert xopt.__file__.startswith(sys.argv[2]), xopt.__file__
c1 = time.process_time()
xopt.set_num_threads(2)
names = ["SGD", "Momentum", "AdaGrad", "RMSprop", "Adam", "AdaDelta", "Adamax", "NAdam", "RAdam", "Lion", "ScheduleFreeAdamW"]
for dtype in (np.float32, np.float64):
    for name in names:
        make = getattr(xopt, name)
        opt = make(momentum=0.9) if name == "SGD" else make()
        small, large = {"p": np.ones(4, dtype)}, {"q": np.ones(1 << 21, dtype)}
        for params in (small, small, large):
            opt.update(params, {k: np.ones_like(v) for k, v in params.items()})
        make(clip_grad_norm=1.0).update(small, {"p": np.ones(4, dtype)})
c2 = time.process_time()
print(c1 - c0, c2 - c1)
"""


_BREAKDOWN = """
import time, sys
c0 = time.process_time()
import numpy as np, xopt
assert xopt.__file__.startswith(sys.argv[2]), xopt.__file__
c1 = time.process_time()
import numba
c2 = time.process_time()
from numba.core.registry import cpu_target
cpu_target.target_context.refresh()
cpu_target.typing_context.refresh()
c3 = time.process_time()
p = {"w": np.ones(1000, np.float32), "b": np.ones(10, np.float32)}
g = {k: np.ones_like(v) for k, v in p.items()}
getattr(xopt, sys.argv[1])().update(p, g)
c4 = time.process_time()
assert p["w"][0] != 1.0
print(c1 - c0, c2 - c1, c3 - c2, c4 - c3)
"""

_IMPORTS_NUMBA = """
import sys
import numpy as np, xopt
p = {"w": np.ones(1000, np.float32), "b": np.ones(10, np.float32)}
getattr(xopt, sys.argv[1])().update(p, {k: np.ones_like(v) for k, v in p.items()})
print(int("numba" in sys.modules))
"""


def _measure(tree, optimizer, cache_dir, child=None):
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(tree).resolve()), NUMBA_CACHE_DIR=cache_dir)
    child = child or (_ALL_RULES if optimizer == "all rules" else _CHILD)
    out = subprocess.run([sys.executable, "-c", child, optimizer, env["PYTHONPATH"]], env=env, capture_output=True, text=True,
                         check=True, cwd=cache_dir).stdout.split()  # cwd: not a tree ("-c" puts it first on the path)
    return [float(x) for x in out]


def _breakdown(args):
    """Print (and return) the medians of each phase of a warm process, per tree and optimizer."""
    times = {}
    for _ in range(args.rounds):
        for optimizer in args.optimizers:
            for tree in args.trees:
                with tempfile.TemporaryDirectory(prefix="xopt-first-use-") as cache:
                    _measure(tree, optimizer, cache)  # fills the cache
                    phases = _measure(tree, optimizer, cache, _BREAKDOWN)
                    imports = _measure(tree, optimizer, cache, _IMPORTS_NUMBA)[0]
                row = times.setdefault((tree, optimizer), {"numba_import": [], "numba_setup": [], "update_after": [],
                                                          "update_imports_numba": []})
                row["numba_import"].append(phases[1])
                row["numba_setup"].append(phases[2])
                row["update_after"].append(phases[3])
                row["update_imports_numba"].append(imports)
    print(f"{'tree':30s} {'optimizer':10s} {'numba import s':>15s} {'numba set-up s':>15s} {'then update s':>14s} "
          f"{'plain update imports numba':>27s}")
    rows = []
    for (tree, optimizer), row in times.items():
        med = {k: statistics.median(v) for k, v in row.items()}
        rows.append({"tree": tree, "optimizer": optimizer, **{f"{k}_cpu_s": v for k, v in med.items() if k != "update_imports_numba"},
                     "update_imports_numba": bool(med["update_imports_numba"]), "runs": row})
        print(f"{tree:30s} {optimizer:10s} {med['numba_import']:15.3f} {med['numba_setup']:15.3f} "
              f"{med['update_after']:14.3f} {'yes' if med['update_imports_numba'] else 'no':>27s}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", nargs="+", default=["."])
    ap.add_argument("--optimizers", nargs="+", default=["Adam", "SGD"])
    ap.add_argument("--all-rules", action="store_true", help="every fused optimizer and dtype instead")
    ap.add_argument("--breakdown", action="store_true", help="a warm process's phases instead")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.all_rules:
        args.optimizers = ["all rules"]
    if args.breakdown:
        rows = _breakdown(args)
    else:
        rows = _first_updates(args)
    if args.out:
        result = {"command": "python benchmarks/first_use.py " + " ".join(argv or sys.argv[1:]),
                  "load_average": os.getloadavg(), "cpu_count": os.cpu_count(), "rows": rows}
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def _first_updates(args):
    """Print (and return) the medians of import, cold and warm first update, per tree and optimizer."""
    times = {}
    for _ in range(args.rounds):
        for optimizer in args.optimizers:
            for tree in args.trees:
                with tempfile.TemporaryDirectory(prefix="xopt-first-use-") as cache:
                    cold = _measure(tree, optimizer, cache)
                    warm = _measure(tree, optimizer, cache)
                row = times.setdefault((tree, optimizer), {"import": [], "cold": [], "warm": []})
                row["import"].append(warm[0])
                row["cold"].append(cold[1])
                row["warm"].append(warm[1])
    rows = []
    print(f"{'tree':30s} {'optimizer':10s} {'import s':>9s} {'first update cold s':>20s} {'warm s':>8s}")
    for (tree, optimizer), row in times.items():
        med = {k: statistics.median(v) for k, v in row.items()}
        rows.append({"tree": tree, "optimizer": optimizer, **{f"{k}_cpu_s": v for k, v in med.items()},
                     "runs": row})
        print(f"{tree:30s} {optimizer:10s} {med['import']:9.2f} {med['cold']:20.2f} {med['warm']:8.3f}")
    return rows


if __name__ == "__main__":
    main()
