"""The error a float32 state picks up converting to 8-bit state and back (load_state_dict both ways).

Adam (float32 state) runs 50 steps on one param of 2^20 elements with normal grads of per-row scales spread over
four decades (as layers' grads are); its state is loaded into ``Adam(state_dtype="8bit")`` and that one's back
into a float32 Adam.  For m and v: the largest error relative to the block's absmax, and the median and 99th
percentile of the error relative to the element itself (elements of at least 1e-3 of their block's absmax), and
the share of nonzero elements that read 0 afterwards, to ``benchmarks/results/state-8bit-roundtrip.json``.  The
same figures for bitsandbytes' dynamic maps (quantized by the reference rule from the same float32 state), side
by side.

    python benchmarks/state_8bit_roundtrip.py [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

import xopt
from xopt.engines import blockwise


def _errors(exact, kept):
    absmax = np.repeat(np.abs(exact.reshape(-1, 256)).max(axis=1), 256)
    err = np.abs(kept - exact)
    big = np.abs(exact) >= 1e-3 * absmax
    rel = err[big] / np.abs(exact[big])
    return {"max_error_over_block_absmax": float((err / absmax).max()),
            "median_relative_error": float(np.median(rel)),
            "p99_relative_error": float(np.percentile(rel, 99)),
            "share_at_least_1e-3_of_absmax": float(big.mean()),
            "share_of_nonzero_read_as_zero": float(np.mean(kept[exact != 0] == 0))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "state-8bit-roundtrip.json"))
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    rows, cols = 1024, 1024
    scales = 10.0 ** rng.uniform(-4, 0, size=(rows, 1))
    params = {"w": rng.standard_normal((rows, cols)).astype(np.float32)}
    full = xopt.Adam(lr=1e-3)
    for _ in range(50):
        full.update(params, {"w": (rng.standard_normal((rows, cols)) * scales).astype(np.float32)})
    eight = xopt.Adam(lr=1e-3, state_dtype="8bit")
    eight.load_state_dict(full.state_dict(), params=params)
    back = xopt.Adam(lr=1e-3)
    back.load_state_dict(eight.state_dict(), params=params)
    out = {"command": "python benchmarks/state_8bit_roundtrip.py", "elements": rows * cols, "block_size": 256}
    for name in ("m", "v"):
        exact, kept = full.state["w"][name].reshape(-1), back.state["w"][name].reshape(-1)
        out[name] = _errors(exact, kept)
        code = blockwise.dynamic_map(name == "m")
        codes, scales = blockwise.quantize(np, exact, code, 256)
        out[name + "_dynamic_map"] = _errors(exact, blockwise.dequantize(np, codes, scales, code, 256, np.float32))
    path = pathlib.Path(a.out)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
