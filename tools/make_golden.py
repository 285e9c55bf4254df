"""Write tests/golden/torch_trajectories.npz: torch.optim's trajectories for every case in tests/torch_cases.py.

Run from the repository root with torch installed (pip install torch==2.13.0):

    python tools/make_golden.py

The tests replay these inputs through xopt and compare, so the suite needs no torch.
"""

import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from torch_cases import CASES, inputs, run_torch  # noqa: E402

SEED = 20261124


def main():
    params, grads = inputs(SEED)
    arrays = {f"input/param/{k}": v for k, v in params.items()}
    for step, g in enumerate(grads):
        arrays.update({f"input/grad/{step}/{k}": v for k, v in g.items()})
    for case in CASES:
        trajectory, state = run_torch(case, params, grads)
        for step, p in enumerate(trajectory):
            arrays.update({f"{case}/param/{step}/{k}": v for k, v in p.items()})
        for k, st in state.items():
            arrays.update({f"{case}/state/{k}/{name}": v for name, v in st.items()})
    meta = {"torch": torch.__version__, "seed": SEED, "cases": sorted(CASES)}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    out = ROOT / "tests" / "golden" / "torch_trajectories.npz"
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(CASES)} cases, torch {torch.__version__})")


if __name__ == "__main__":
    main()
