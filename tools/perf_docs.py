#!/usr/bin/env python3
"""The performance tables and plots of the docs and the README, printed from the committed results.

    python tools/perf_docs.py                 # every table, in Markdown
    python tools/perf_docs.py step loop       # some of them (names: see TABLES)
    python tools/perf_docs.py --plots DIR     # the plots of the full CPU run, drawn from its JSON into DIR

Nothing here is typed by hand: every figure is read from ``benchmarks/results/``.  The docs site gets the
same text at build time: a line ``<!-- perf: NAME -->`` in a page under ``docs/`` is replaced by table NAME
(``tools/mkdocs_hooks.py``), and the plots are drawn into the site.  To show a new run, point the constants
below at its results and rebuild.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

FULL_RUN = "cpu-2026-12-04/results.json"  # xopt-bench --device cpu: step and loop scenarios
LANE_LOOP = "loop-book-lane-d/results.json"  # the loop again, on the exact-type lane of today's code
TORCH_TENSORS = "torch-tensors-lane-b-2026-12-04.json"
STEP_MEMORY = "step-memory-8bit-2026-12-03.json"
DASK_SWEEP = "dask-sweep-2026-11-25.json"
CUDA_HOST = "cuda-host-2026-12-03b.json"
CLIP_COST = "clip-cost-2026-11-25f.json"
MANY_PARAMS = "many-params-2026-12-03.json"
LEAN_STEP = "lean-step-2026-12-04e.json"
MUON = "muon-bench-2026-12-03/results.json"  # xopt-bench --scenario muon

STEP_CASES = [  # (label, optimizer, tensors > 1, impl shown as xopt, peer)
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


def load(name):
    return json.loads((RESULTS / name).read_text())


def _ms(seconds):
    return f"{seconds * 1e3:.2f} ms"


def _x(value):
    return "" if value is None else f"{value:.2f}x"


def _source(name, result=None):
    """Where a table's figures come from: the file, and the commit and command when the file says."""
    result = result if result is not None else load(name)
    parts = [f"`benchmarks/results/{name}`"]
    if result.get("commit"):
        commit = result["commit"]  # "<sha>-dirty": measured with changes not committed yet
        parts.append(f"commit {commit[:7]}" + (" with uncommitted changes" if commit.endswith("-dirty") else ""))
    command = result.get("command") or result.get("meta", {}).get("command")
    if command:
        command = re.sub(r"/\S*/(benchmarks/results/)", r"\1", command)  # an absolute --out, as a repository path
        parts.append(f"`{command}`")
    if result.get("device"):
        parts.append(result["device"])
    return "Source: " + ", ".join(parts) + "."


def step_case_rows(result):
    """(label, xopt row, peer name, peer row, seed row) of each case of STEP_CASES found in a full run."""
    rows = [r for r in result["rows"] if r.get("scenario", "step") == "step"]
    out = []
    for label, opt, many, impl, peer in STEP_CASES:
        sel = [r for r in rows if r["optimizer"] == opt and (r["tensors"] > 1) == many]
        if not sel:
            continue
        if not many:
            biggest = max(r["numel"] for r in sel)
            sel = [r for r in sel if r["numel"] == biggest]
        by = {r["impl"]: r for r in sel}
        if impl in by:
            out.append((label, by[impl], peer, by.get(peer), by.get("seed")))
    return out


def step():
    """One optimizer step alone, float32, against torch.optim and the seed's code (the full run)."""
    result = load(FULL_RUN)
    lines = ["| case (float32) | xopt | peer | seed | peer's time / xopt's | seed's time / xopt's | "
             "xopt roofline fraction |", "|---|---:|---|---:|---:|---:|---:|"]
    for label, x, peer, p, s in step_case_rows(result):
        lines.append(f"| {label} | {_ms(x['seconds'])} | {peer + ' ' + _ms(p['seconds']) if p else ''} | "
                     f"{_ms(s['seconds']) if s else ''} | {_x(p['seconds'] / x['seconds']) if p else ''} | "
                     f"{_x(s['seconds'] / x['seconds']) if s else ''} | {x['roofline_fraction']:.2f} |")
    variants = ", ".join(f"{k} {v:.1f}" for k, v in result["copy_variants_GBps"].items())
    lines += ["", f"Copy roofline {result['copy_GBps']:.1f} GB/s ({variants}); kernels loaded from numba's "
                  f"disk cache in {result['compile_seconds']:.2f} s.  " + _source(FULL_RUN, result)]
    return "\n".join(lines)


def _loop(name):
    result = load(name)
    rows = [r for r in result["rows"] if r.get("scenario") == "loop"]
    nets = {}
    for r in rows:
        nets.setdefault((r["net"], r["optimizer"]), {})[r["impl"]] = r
    has_reference = any("xopt-reference" in v for v in nets.values())
    has_torch = any(k.startswith("torch") for v in nets.values() for k in v)
    head = ["net, optimizer", "xopt update", "seed update", "update: seed's time / xopt's",
            "iteration: seed's / xopt's"]
    head += ["reference update: seed's / its"] * has_reference + ["torch update"] * has_torch
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for (net, opt), by in nets.items():
        x, s = by.get("xopt"), by.get("seed")
        if x is None:
            continue
        first = next(iter(by.values()))
        cells = [f"{net} ({first['net_layers']}, batch {first['batch']}, {first['dtype']}), {opt}",
                 f"{x['update_ms']:.3f} ms", f"{s['update_ms']:.3f} ms" if s else "",
                 _x(x.get("update_vs_seed")), _x(x.get("iteration_vs_seed"))]
        if has_reference:
            ref = by.get("xopt-reference")
            cells.append(_x(ref.get("update_vs_seed")) if ref else "")
        if has_torch:
            t = next(((k, v) for k, v in by.items() if k.startswith("torch")), None)
            cells.append(f"{t[1]['update_ms']:.3f} ms ({t[0]})" if t else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", _source(name, result)]
    return "\n".join(lines)


def loop():
    """A NumPy MLP's training loop: the update alone and the whole iteration (the full run)."""
    return _loop(FULL_RUN)


def loop_lane():
    """The same loop on the book's net, measured again on the exact-type lane."""
    return _loop(LANE_LOOP)


def torch_tensors():
    """torch CPU tensors stepped by the CPU kernel, against torch's fused and foreach Adam."""
    result = load(TORCH_TENSORS)
    lines = ["| net | params (tensors) | xopt | torch fused | torch foreach | xopt's time / torch fused's | "
             "float64 max \\|xopt − torch\\| after 5 steps |", "|---|---:|---:|---:|---:|---:|---:|"]
    for net, r in result["nets"].items():
        us = r["median_us"]
        diff = next(v for k, v in r.items() if k.startswith("float64 max"))
        lines.append(f"| {net} | {r['params']:,} ({r['tensors']}) | {us['xopt']:,.0f} µs | "
                     f"{us['torch fused']:,.0f} µs | {us['torch foreach']:,.0f} µs | {r['xopt / torch fused']:.2f} | "
                     f"{diff:.1e} |")
    lines += ["", f"torch {result['torch']}, {result['threads']} threads.  Source: "
                  f"`benchmarks/results/{TORCH_TENSORS}`, `python benchmarks/torch_tensors.py`."]
    return "\n".join(lines)


def step_memory():
    """Peak memory growth of an Adam step on one 256 MiB param."""
    result = load(STEP_MEMORY)
    mib = 2 ** 20
    lines = ["| | first step (makes the state) | every later step |", "|---|---:|---:|"]
    for case, r in result["cases"].items():
        lines.append(f"| {case} | {r['first_step_bytes'] / mib:,.0f} MiB ({r['first_step_params']:.2f} p) | "
                     f"{r['second_step_bytes'] / mib:,.0f} MiB ({r['second_step_params']:.2f} p) |")
    lines += ["", f"{result['what']}; {result['dtype']}, {result['numel']:,} elements.  Source: "
                  f"`benchmarks/results/{STEP_MEMORY}`, `python benchmarks/step_memory.py`."]
    return "\n".join(lines)


def dask():
    """Dask steps: xopt against plain dask.array, by size and chunk count."""
    result = load(DASK_SWEEP)
    rows = result["rows"]
    one = {r["numel"]: r for r in rows if r["impl"] == "xopt"}
    by = {(r["numel"], r["chunks"], r["impl"]): r for r in rows if r["chunks"]}
    lines = ["| elements | chunks | xopt on Dask | plain dask.array | xopt / plain (median of rounds) | "
             "tasks per step, xopt / plain | xopt, one process |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for numel, chunks in sorted({(n, c) for n, c, _ in by}):
        x, p = by.get((numel, chunks, "xopt-dask")), by.get((numel, chunks, "plain-dask"))
        if not (x and p):
            continue
        ratios = sorted(a / b for a, b in zip(x["per_round_seconds"], p["per_round_seconds"]))
        median = ratios[len(ratios) // 2]
        lines.append(f"| 2^{numel.bit_length() - 1} | {chunks} | {x['seconds'] * 1e3:.0f} ms | "
                     f"{p['seconds'] * 1e3:.0f} ms | {median:.2f}x | {x.get('tasks_per_step', '')} / "
                     f"{p.get('tasks_per_step', '')} | "
                     + (f"{one[numel]['seconds'] * 1e3:.0f} ms" if numel in one else "") + " |")
    cluster = result["cluster"]
    lines += ["", f"{cluster['workers']} worker processes, {cluster['threads_per_worker']} thread each, "
                  f"{result['rounds']} rounds.  " + _source(DASK_SWEEP, result)]
    return "\n".join(lines)


def dask_fit():
    """The cost model fitted to the Dask sweep: fixed + per chunk + per byte."""
    result = load(DASK_SWEEP)
    names = {"xopt-dask": "xopt on Dask", "plain-dask": "plain dask.array"}
    lines = ["| | fixed | per chunk | per GB moved | residuals |", "|---|---:|---:|---:|---:|"]
    for f in result["fits"]:
        res = f["relative_residuals"]
        lines.append(f"| {names.get(f['impl'], f['impl'])} | {f['fixed_s'] * 1e3:.0f} ms | "
                     f"{f['per_chunk_s'] * 1e3:.1f} ms | {f['per_GB_s']:.2f} s | "
                     f"{min(res) * 100:+.0f} % to {max(res) * 100:+.0f} % |")
    lines += ["", "A least-squares fit, in relative error, of the median step times of the table above.  "
                  + _source(DASK_SWEEP, result)]
    return "\n".join(lines)


def cuda_host():
    """Host time of a CUDA step, on the CPU with the CUDA calls stubbed."""
    result = load(CUDA_HOST)
    rows = [r for r in result["rows"] if r["reader"] == "compiled"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    sizes = sorted({r["tensors"] for r in rows})
    by = {(r["case"], r["tensors"]): r for r in rows}
    lines = ["| case | " + " | ".join(f"{n:,} tensors" for n in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for case in cases:
        lines.append(f"| `{case}` | " + " | ".join(
            f"{by[(case, n)]['us_per_step']:,.0f} µs" if (case, n) in by else "" for n in sizes) + " |")
    lines += ["", f"Adam, new grad arrays every step, {result['elements_per_tensor']} elements a tensor, "
                  f"CuPy {result['cupy']}; load average {result['load_average'][0]:.1f}.  "
                  + _source(CUDA_HOST, result)]
    return "\n".join(lines)


def clip_cost():
    """A step with clip_grad_norm against one without."""
    result = load(CLIP_COST)
    lines = ["| threads | case | unclipped | clipped | ratio |", "|---:|---|---:|---:|---:|"]
    command = None
    for key, part in result.items():
        command = part["meta"].get("command", command)
        for case, r in part["rows"].items():
            lines.append(f"| {part['meta']['threads']} | {r['tensors']:,} tensor{'s' * (r['tensors'] > 1)}, {r['elements']:,} elements | "
                         f"{r['unclipped_ms']:.2f} ms | {r['clipped_ms']:.2f} ms | {r['ratio']:.2f}x |")
    lines += ["", f"Adam, float32.  Source: `benchmarks/results/{CLIP_COST}`" + (f", `{command}`." if command else ".")]
    return "\n".join(lines)


def many_params():
    """100,000 small params: a state's round trip."""
    result = load(MANY_PARAMS)
    lines = ["| case | seconds (median) | min | max |", "|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['case']} | {r['seconds']:.2f} | {r['min']:.2f} | {r['max']:.2f} |")
    lines += ["", f"{result['params']:,} params of {result['min_size']}–{result['max_size']} elements, "
                  f"state file {result['file_bytes'] / 1e6:.1f} MB.  " + _source(MANY_PARAMS, result)]
    return "\n".join(lines)


def lean_step():
    """What a call costs beyond its arrays: new dicts and arrays every step, tiny params, many params."""
    result = load(LEAN_STEP)
    lines = ["| ratio | value |", "|---|---:|"]
    for r in result["ratios"]:
        lines.append(f"| {r['ratio']} | {r['value']:.2f} |")
    for case, r in result["many_params_seconds"].items():
        lines.append(f"| 100,000 float32 params of 1–16 elements, Adam: {case} | {r['seconds']:.2f} s |")
    lines += ["", "Each value is a ratio of times, the first named over the second; \"new every way\": a new params "
                  "dict, new grad arrays and a new optimizer at every call.  " + _source(LEAN_STEP, result)]
    return "\n".join(lines)


def muon():
    """Muon's step: Newton-Schulz FLOP/s beside a plain matmul of the same matrices, and torch.optim.Muon."""
    result = load(MUON)
    rows = [r for r in result["rows"] if r.get("scenario") == "muon"]
    torch = {(r["matrices"], r["rows"], r["cols"]): r for r in rows if r["impl"] == "torch"}
    lines = ["| matrices | impl | ms per step | GFLOP/s | of the matmul's | torch's time / xopt's |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        case = (r["matrices"], r["rows"], r["cols"])
        t = torch.get(case)
        vs = _x(t["seconds"] / r["seconds"]) if t is not None and r["impl"] == "xopt" else ""
        lines.append(f"| {r['matrices']} x {r['rows']}x{r['cols']} {r['dtype']} | {r['impl']} | "
                     f"{r['seconds'] * 1e3:.1f} | {r['GFLOPs']:.1f} | {r['peak_fraction']:.2f} | {vs} |")
    lines += ["", "GFLOP/s: the iteration's nominal flops (the matmul row: its own) over the median time.  "
                  + _source(MUON, result)]
    return "\n".join(lines)


def headline():
    """The README's table: a few figures, each from the runs above."""
    full = load(FULL_RUN)
    steps = {label: (x, p, s) for label, x, _, p, s in step_case_rows(full)}
    tt = load(TORCH_TENSORS)["nets"]
    found = re.fullmatch(r"(.*) \((\d+) cores\)", full["device"])
    machine = f"{found.group(2)}-core {found.group(1)}" if found else full["device"]
    lines = [f"| what ({machine}, float32 unless said) | figure |", "|---|---:|"]
    x, p, _ = steps["Adam, 1 tensor of 2^25"]
    lines.append(f"| Adam step, one tensor of 2^25: torch fused's time / xopt's | {_x(p['seconds'] / x['seconds'])} "
                 f"({x['roofline_fraction']:.2f} of the copy roofline) |")
    x, p, _ = steps["Adam, 2,000 tensors of 64–4096"]
    lines.append(f"| Adam step, 2,000 tensors of 64–4096: torch fused's time / xopt's | "
                 f"{_x(p['seconds'] / x['seconds'])} |")
    r = {(r["net"], r["optimizer"], r["impl"]): r for r in full["rows"] if r.get("scenario") == "loop"}.get(
        ("book", "Adam", "xopt"))  # the full run's, as the rows above (a quieter loop-only run: loop_lane's table)
    if r:
        lines.append(f"| Adam update in the book's MLP loop (float64): the seed's time / xopt's | "
                     f"{_x(r['update_vs_seed'])} |")
    for net, v in tt.items():
        lines.append(f"| Adam on torch CPU tensors, {net.split(' (')[0]}: torch fused's time / xopt's | "
                     f"{_x(1 / v['xopt / torch fused'])} |")
    return "\n".join(lines)


TABLES = {f.__name__: f for f in (step, loop, loop_lane, torch_tensors, step_memory, dask, dask_fit, cuda_host,
                                  clip_cost, many_params, lean_step, muon, headline)}


def plots(out_dir):
    """Draw the full run's plots (throughput, many tensors, loop) from its JSON into out_dir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    from xopt.bench import report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report.plot(load(FULL_RUN), str(out_dir))
    return sorted(out_dir.glob("*.png"))


def main(argv):
    if argv[:1] == ["--plots"]:
        for path in plots(argv[1]):
            print(path)
        return
    for name in argv or TABLES:
        print(f"## {name}: {TABLES[name].__doc__}\n\n{TABLES[name]()}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
