"""What a benchmark run leaves: the terminal table, the results JSON, the PNG plots."""

from __future__ import annotations

import json
import os
import platform
import subprocess

__all__ = ["ROW_FIELDS", "environment", "table", "write_json", "plot"]

ROW_FIELDS = ("optimizer", "impl", "dtype", "numel", "tensors", "seconds", "GBps", "roofline_fraction")


def _commit():
    """The sha of the measured tree, '-dirty' if it has uncommitted changes; 'unknown' outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def environment(backend):
    """commit, device, backend, versions: the run's identity."""
    import numpy

    import xopt

    versions = {"python": platform.python_version(), "xopt": xopt.__version__, "numpy": numpy.__version__}
    for name in ("numba", "torch", "cupy", "array_api_compat"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    if backend == "cupy":
        import cupy

        device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    else:
        device = _cpu_name()
    return {"commit": _commit(), "device": device, "backend": backend, "versions": versions}


def table(result) -> str:
    """Rows grouped by case; each impl's time, GB/s, roofline fraction and ratio to the seed and torch-fused."""
    rows = result["rows"]
    header = (f"{'optimizer':<9} {'dtype':<8} {'numel':>10} {'tensors':>7} {'impl':<15} {'ms/step':>9} "
              f"{'GB/s':>7} {'roofline':>8} {'vs seed':>8} {'vs torch-fused':>14}")
    copies = ", ".join(f"{k} {v:.1f}" for k, v in result.get("copy_variants_GBps", {}).items())
    lines = [f"device: {result['device']}   copy bandwidth (roofline): {result['copy_GBps']:.1f} GB/s ({copies})",
             header,
             "-" * len(header)]
    cases = {}
    for r in rows:
        cases.setdefault((r["optimizer"], r["dtype"], r["numel"], r["tensors"]), {})[r["impl"]] = r
    for (opt, dtype, numel, tensors), impls in cases.items():
        for impl, r in impls.items():
            def ratio(other):
                o = impls.get(other)
                return f"{o['seconds'] / r['seconds']:.2f}x" if o and impl != other else ""
            cache = "*" if r.get("fits_in_cache") else " "
            lines.append(f"{opt:<9} {dtype:<8} {numel:>10}{cache}{tensors:>7} {impl:<15} {r['seconds'] * 1e3:>9.3f} "
                         f"{r['GBps']:>7.1f} {r['roofline_fraction']:>8.2f} {ratio('seed'):>8} "
                         f"{ratio('torch-fused'):>14}")
    lines.append("'vs X' = X's time / this row's time (above 1: this row is faster).  "
                 "* = the step's bytes fit in the CPU cache.")
    return "\n".join(lines)


def write_json(result, path):
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


def plot(result, out_dir):
    """throughput.png (GB/s against size, roofline drawn in) and many_tensors.png; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    from .runner import IMPLS

    color = {impl: f"C{k}" for k, impl in enumerate(IMPLS)}  # one colour per impl in every panel
    paths = []
    single = [r for r in rows if r["tensors"] == 1]
    many = [r for r in rows if r["tensors"] > 1]
    title = f"{result['device']} ({result['backend']}), {result['commit'][:12]}"
    if single:
        groups = sorted({(r["optimizer"], r["dtype"]) for r in single})
        ncols = min(4, len(groups))
        nrows = -(-len(groups) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.3 * nrows + 0.8), squeeze=False,
                                 sharey=True)
        for ax, (opt, dtype) in zip(axes.flat, groups):
            for impl in IMPLS:
                pts = sorted((r["numel"], r["GBps"]) for r in single
                             if (r["optimizer"], r["dtype"], r["impl"]) == (opt, dtype, impl))
                if pts:
                    ax.plot(*zip(*pts), marker="o", markersize=3, color=color[impl], label=impl)
            ax.axhline(result["copy_GBps"], color="k", linestyle="--", label="copy roofline")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("elements")
            ax.set_title(f"{opt} {dtype}", fontsize=10)
        for ax in axes.flat[len(groups):]:
            ax.axis("off")
        for row in axes:
            row[0].set_ylabel("GB/s (minimal bytes / time)")
        handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        paths.append(os.path.join(out_dir, "throughput.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    if many:
        cases = sorted({(r["optimizer"], r["dtype"], r["tensors"]) for r in many})
        impls = [impl for impl in IMPLS if any(r["impl"] == impl for r in many)]
        fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(cases)), 4.5))
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            labelled = False
            for i, case in enumerate(cases):
                r = next((r for r in many if (r["optimizer"], r["dtype"], r["tensors"]) == case
                          and r["impl"] == impl), None)
                if r:
                    ax.bar(i + j * width, r["seconds"] * 1e3, width, color=color[impl],
                           label=None if labelled else impl)
                    labelled = True
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels([f"{o} {d}\n{t} tensors" for o, d, t in cases], fontsize=8)
        ax.set_ylabel("ms per step")
        ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2)
        ax.set_title(f"one step over many small tensors ({title})", fontsize=9)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "many_tensors.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
