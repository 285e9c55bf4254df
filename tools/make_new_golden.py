"""Write tests/golden/new_optimizers.npz: the libraries' trajectories for every case in tests/test_new_optimizers.py.

Run from the repository root with torch 2.13, optax (with jax) and schedulefree installed:

    python tools/make_new_golden.py

Adafactor and Muon are torch.optim's, LAMB is optax.lamb, ScheduleFreeAdamW is schedulefree's
AdamWScheduleFree, all in float64.  The tests replay these inputs through xopt and compare, so the
suite needs none of those libraries.
"""

import json
import pathlib
import sys
from importlib import metadata

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_new_optimizers import CASES, STEPS, inputs, run_library  # noqa: E402

SEED = 20261203


def main():
    params, grads = inputs(SEED)
    arrays = {f"input/param/{k}": v for k, v in params.items()}
    arrays.update({f"input/grad/{k}": np.stack([g[k] for g in grads]) for k in params})  # (step, *shape)
    for case in sorted(CASES):
        trajectory, state = run_library(case, params, grads)
        assert len(trajectory) == STEPS
        arrays.update({f"{case}/param/{k}": np.stack([p[k] for p in trajectory]) for k in params})
        for k, st in state.items():
            arrays.update({f"{case}/state/{k}/{name}": v for name, v in st.items()})
    versions = {}
    for package in ("torch", "optax", "jax", "schedulefree"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    meta = {"versions": versions, "seed": SEED, "cases": sorted(CASES)}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    out = ROOT / "tests" / "golden" / "new_optimizers.npz"
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(CASES)} cases, {versions})")


if __name__ == "__main__":
    main()
