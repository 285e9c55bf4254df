"""What a benchmark run leaves: the terminal table, the results JSON, the PNG plots."""

from __future__ import annotations

import json
import os
import platform
import subprocess

from . import muon

__all__ = ["ROW_FIELDS", "LOOP_ROW_FIELDS", "environment", "table", "loop_table", "write_json", "plot"]

ROW_FIELDS = ("scenario", "optimizer", "impl", "dtype", "numel", "tensors", "seconds", "seconds_spread", "GBps",
              "roofline_fraction")
LOOP_ROW_FIELDS = ("scenario", "net", "net_layers", "batch", "dtype", "params", "optimizer", "impl", "update_ms",
                   "iteration_ms", "update_ms_spread", "iteration_ms_spread", "update_vs_seed", "iteration_vs_seed",
                   "update_vs_torch", "iteration_vs_torch", "torch_peer", "loss_first", "loss_last",
                   "params_max_rel_diff_vs_seed")


def step_rows(result):
    """The rows of the step scenario (results written before the loop scenario existed have no 'scenario')."""
    return [r for r in result["rows"] if r.get("scenario", "step") == "step"]


def loop_rows(result):
    return [r for r in result["rows"] if r.get("scenario") == "loop"]


def _iqr_percent(spread, median):
    """The interquartile range over rounds, in % of the median ('' when not recorded)."""
    if not spread or not median:
        return ""
    return f"{100 * (spread['q3'] - spread['q1']) / median:.0f}%"


def commit():
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


def machine() -> str:
    """The CPU's model name and core count (/proc/cpuinfo; elsewhere what platform knows): the machine a
    result was measured on."""
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
        except Exception:  # not installed, or an install whose import raises
            pass
    if backend == "cupy":
        import cupy

        device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    else:
        device = machine()
    return {"commit": commit(), "device": device, "backend": backend, "versions": versions}


def table(result) -> str:
    """The step table (then the loop table, if the run has loop rows)."""
    parts = []
    if step_rows(result):
        parts.append(step_table(result))
    if loop_rows(result):
        parts.append(loop_table(result))
    muon_rows = [r for r in result["rows"] if r.get("scenario") == "muon"]
    if muon_rows:
        parts.append(muon.table(muon_rows))
    return "\n\n".join(parts)


def _state_bytes(row) -> str:
    value = row.get("state_bytes_per_param")
    return "" if value is None or not row["impl"].startswith("xopt") else f"{value:.2f}"


def step_table(result) -> str:
    """Rows grouped by case; each impl's time, its spread, GB/s, roofline fraction, ratios to seed and torch-fused."""
    rows = step_rows(result)
    header = (f"{'optimizer':<9} {'dtype':<8} {'numel':>10} {'tensors':>7} {'impl':<15} {'ms/step':>9} {'IQR':>5} "
              f"{'GB/s':>7} {'roofline':>8} {'state B':>7} {'vs seed':>8} {'vs torch-fused':>14}")
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
            iqr = _iqr_percent(r.get("seconds_spread"), r["seconds"])
            lines.append(f"{opt:<9} {dtype:<8} {numel:>10}{cache}{tensors:>7} {impl:<15} {r['seconds'] * 1e3:>9.3f} "
                         f"{iqr:>5} {r['GBps']:>7.1f} {r['roofline_fraction']:>8.2f} {_state_bytes(r):>7} "
                         f"{ratio('seed'):>8} {ratio('torch-fused'):>14}")
    lines.append("'vs X' = X's time / this row's time (above 1: this row is faster).  "
                 "* = the step's bytes fit in the CPU cache.  IQR = interquartile range over rounds, % of the median.  "
                 "state B = bytes of optimizer state per param element (xopt's rows).")
    return "\n".join(lines)


def loop_table(result) -> str:
    """The loop scenario: per net and optimizer, each impl's update and iteration time and ratios."""
    rows = loop_rows(result)

    def x(value):
        return f"{value:.2f}x" if value is not None else ""

    header = (f"{'net':<5} {'optimizer':<9} {'impl':<15} {'update ms':>10} {'IQR':>5} {'iter ms':>9} {'IQR':>5} "
              f"{'update %':>8} {'upd vs seed':>11} {'iter vs seed':>12} {'upd vs torch':>12} {'iter vs torch':>13} "
              f"{'loss first→last':>16} {'params vs seed':>14}")
    lines = ["loop: forward + backward + update of a NumPy MLP; ms per iteration, median over rounds"]
    for name in dict.fromkeys(r["net"] for r in rows):
        r = next(r for r in rows if r["net"] == name)
        lines.append(f"  {name}: {r['net_layers']}, batch {r['batch']}, {r['dtype']}, {r['params']:,} params in "
                     f"{r['tensors']} tensors; {r['rounds']} rounds of {r['block']} iterations per impl")
    lines += [header, "-" * len(header)]
    for r in rows:
        diff = r.get("params_max_rel_diff_vs_seed")
        lines.append(
            f"{r['net']:<5} {r['optimizer']:<9} {r['impl']:<15} {r['update_ms']:>10.3f} "
            f"{_iqr_percent(r['update_ms_spread'], r['update_ms']):>5} {r['iteration_ms']:>9.3f} "
            f"{_iqr_percent(r['iteration_ms_spread'], r['iteration_ms']):>5} {100 * r['update_share']:>7.0f}% "
            f"{x(r['update_vs_seed']):>11} {x(r['iteration_vs_seed']):>12} {x(r['update_vs_torch']):>12} "
            f"{x(r['iteration_vs_torch']):>13} {r['loss_first']:>7.3f}→{r['loss_last']:<8.3f} "
            f"{'' if diff is None else f'{diff:.1e}':>14}")
    peers = sorted({r["torch_peer"] for r in rows if r.get("torch_peer")})
    lines.append("update = perf_counter around the update call alone; iter = forward + backward + update.  "
                 "'vs X' = X's time / this row's (above 1: this row is faster); torch = "
                 + (" or ".join(peers) if peers else "not installed")
                 + " (fused where torch has it, else foreach: the impl column says which).  params vs seed = "
                   "largest |p - p_seed| / max |p_seed| after the same iterations.")
    threads = result.get("threads")
    if threads:
        blas = threads.get("threadpools")
        blas = ", ".join(f"{p.get('internal_api')} {p.get('num_threads')} threads" for p in blas
                         if isinstance(p, dict)) if isinstance(blas, list) else blas
        lines.append(f"threads (none set by xopt-bench): numba {threads.get('numba_num_threads')} "
                     f"({threads.get('numba_threading_layer')}), {blas}, torch {threads.get('torch_num_threads')}, "
                     f"{threads.get('cpu_count')} CPUs")
    return "\n".join(lines)


def write_json(result, path):
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


def _plain_log_axis(axis):
    """A log axis labelled 0.1, 0.2, 0.5, 1, 2, 5, ... in plain numbers: no powers of ten, no offset."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot(result, out_dir):
    """throughput.png, many_tensors.png (step scenario) and loop.png (loop scenario); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = step_rows(result)
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
                pts = sorted((r["numel"], r["GBps"], bool(r.get("fits_in_cache"))) for r in single
                             if (r["optimizer"], r["dtype"], r["impl"]) == (opt, dtype, impl))
                if pts:
                    n, gbps, cached = zip(*pts)
                    ax.plot(n, gbps, color=color[impl], label=impl, linewidth=1.2)
                    ax.scatter([a for a, c in zip(n, cached) if not c], [g for g, c in zip(gbps, cached) if not c],
                               s=14, color=color[impl], zorder=3)
                    ax.scatter([a for a, c in zip(n, cached) if c], [g for g, c in zip(gbps, cached) if c],
                               s=22, facecolors="white", edgecolors=color[impl], linewidths=1.2, zorder=3)
            ax.axhline(result["copy_GBps"], color="k", linestyle="--", label="copy roofline")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            _plain_log_axis(ax.yaxis)
            ax.grid(True, which="major", axis="y", alpha=0.3)
            ax.set_xlabel("elements")
            ax.set_title(f"{opt} {dtype}", fontsize=10)
        for ax in axes.flat[len(groups):]:
            ax.axis("off")
        for row in axes:
            row[0].set_ylabel("GB/s (minimal bytes / time), log")
        handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
        handles["open marker: fits in CPU cache"] = ax.scatter([], [], s=22, facecolors="white", edgecolors="grey")
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 5), fontsize=8)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout(rect=(0, 0.08 + 0.03 * (len(handles) > 5), 1, 1))
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
                    ms = r["seconds"] * 1e3
                    ax.bar(i + j * width, ms, width, color=color[impl], label=None if labelled else impl)
                    ax.annotate(f"{ms:.3g}", (i + j * width, ms), xytext=(0, 2), textcoords="offset points",
                                ha="center", va="bottom", fontsize=6)
                    labelled = True
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels([f"{o} {d}\n{t:,} tensors" for o, d, t in cases], fontsize=8)
        ax.set_ylabel("ms per step (log)")
        ax.set_yscale("log")
        _plain_log_axis(ax.yaxis)
        ax.grid(True, which="major", axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        ax.set_title(f"one step over many small tensors\n{title}", fontsize=9)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "many_tensors.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    loop = loop_rows(result)
    if loop:
        paths.append(_plot_loop(plt, loop, title, os.path.join(out_dir, "loop.png")))
    return paths


def _plot_loop(plt, rows, title, path):
    """Per net (columns): update ms (top) and iteration ms (bottom), a bar per impl in each optimizer's group,
    with the seed's time / the bar's time written on it."""
    nets = list(dict.fromkeys(r["net"] for r in rows))
    groups = {net: list(dict.fromkeys(r["optimizer"] for r in rows if r["net"] == net)) for net in nets}
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    color = {impl: f"C{k}" for k, impl in enumerate(("xopt", "xopt-reference", "seed", "torch-fused",
                                                      "torch-foreach"))}
    width = max(6.5, 2.2 + 1.6 * sum(map(len, groups.values())))
    fig, axes = plt.subplots(2, len(nets), squeeze=False, figsize=(width, 7),
                             gridspec_kw={"width_ratios": [max(1, len(groups[n])) for n in nets]})
    for col, net in enumerate(nets):
        first = next(r for r in rows if r["net"] == net)
        for row, kind in enumerate(("update", "iteration")):
            ax = axes[row][col]
            for i, opt in enumerate(groups[net]):
                present = [r for impl in impls for r in rows
                           if (r["net"], r["optimizer"], r["impl"]) == (net, opt, impl)]
                for j, r in enumerate(present):  # only the impls this group has: no gaps
                    x = i + (j + 0.5) * 0.8 / len(present) - 0.4
                    ms = r[f"{kind}_ms"]
                    ax.bar(x, ms, 0.8 / len(present), color=color.get(r["impl"], "grey"))
                    ratio = r.get(f"{kind}_vs_seed")
                    if ratio is not None and r["impl"] != "seed":
                        ax.annotate(f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x", (x, ms), xytext=(0, 2),
                                    textcoords="offset points", ha="center", va="bottom", fontsize=6, rotation=90)
            ax.set_yscale("log")
            _plain_log_axis(ax.yaxis)
            ax.grid(True, which="major", axis="y", alpha=0.3)
            ax.margins(y=0.25)
            ax.set_xticks(range(len(groups[net])))
            ax.set_xticklabels(groups[net], fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{kind} ms (log)")
            if row == 0:
                ax.set_title(f"{net}: {first['net_layers']}\nbatch {first['batch']}, {first['dtype']}", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=color.get(impl, "grey")) for impl in impls]
    fig.legend(handles, impls, loc="lower center", ncol=len(impls), fontsize=8)
    fig.suptitle(f"training loop, ms per iteration: update alone (top),\nforward + backward + update (bottom); "
                 f"on bars: seed's time / this bar's\n{title}", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
