"""Print the README's CPU table from a results JSON, so the README's figures are the file's:

    python tools/readme_table.py benchmarks/results/cpu-2026-11-24/results.json
"""

import json
import sys

CASES = [  # (label, optimizer, tensors > 1, impl shown as xopt, peer)
    ("Adam, 1 tensor of 2^25", "Adam", False, "xopt", "torch-fused"),
    ("Adam, bf16 state, 2^25", "Adam", False, "xopt-bf16-state", "torch-fused"),
    ("Adam, 2,000 tensors of 64–4096", "Adam", True, "xopt", "torch-fused"),
    ("AdamW, 2^25", "AdamW", False, "xopt", "torch-fused"),
    ("RMSprop, 2^25", "RMSprop", False, "xopt", "torch-foreach"),
    ("AdaGrad, 2^25", "AdaGrad", False, "xopt", "torch-fused"),
    ("SGD, 2,000 tensors", "SGD", True, "xopt", "torch-fused"),
    ("NAdam, 2^25", "NAdam", False, "xopt", "torch-foreach"),
    ("RAdam, 2^25", "RAdam", False, "xopt", "torch-foreach"),
    ("Lion, 2^25", "Lion", False, "xopt", None),
]


def main(path):
    result = json.load(open(path))
    rows = [r for r in result["rows"] if r.get("scenario", "step") == "step"]  # the loop rows have their own table
    print(f"commit {result['commit']}, {result['device']}, copy roofline {result['copy_GBps']:.1f} GB/s "
          f"({', '.join(f'{k} {v:.1f}' for k, v in result['copy_variants_GBps'].items())})\n")
    print("| case (float32) | xopt | peer | seed | xopt vs peer | xopt vs seed | xopt roofline fraction |")
    print("|---|---|---|---|---|---|---|")
    for label, opt, many, impl, peer in CASES:
        sel = [r for r in rows if r["optimizer"] == opt and (r["tensors"] > 1) == many]
        if not sel:  # a run without this optimizer or case
            continue
        if not many:
            biggest = max(r["numel"] for r in sel)
            sel = [r for r in sel if r["numel"] == biggest]
        by = {r["impl"]: r for r in sel}
        if impl not in by:
            continue
        x, p, s = by[impl], by.get(peer), by.get("seed")

        def ms(r):
            return f"{r['seconds'] * 1e3:.2f} ms" if r else ""

        print(f"| {label} | {ms(x)} | {f'{peer} {ms(p)}' if p else ''} | {ms(s)} | "
              + (f"{p['seconds'] / x['seconds']:.2f}x" if p else "") + " | "
              + (f"{s['seconds'] / x['seconds']:.1f}x" if s else "") + f" | {x['roofline_fraction']:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
