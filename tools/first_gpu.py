#!/usr/bin/env python3
"""xopt's CUDA kernels on a GPU in one call: checks, timings and the GPU tests, each result written as it comes.

    python tools/first_gpu.py --out DIR [--budget-s 480] [--parts smoke,timing]

Every result is one JSON object on a line of ``DIR/first-gpu.jsonl``, written and flushed as soon as it is
known.  Each line has ``"part"`` and ``"ok"``, and ``"error"`` where something went wrong.  The output of
every part goes to ``DIR/first-gpu.log``; the GPU tests write ``DIR/gpu-tests.txt`` and ``DIR/gpu-tests.xml``.

Each part runs in its own process under its own timeout, so a CUDA fault or a hang loses that part only;
every part ends with a line ``{"part": ..., "end": true, "ok": ..., "seconds": ...}`` written by this
process (``"timed_out": true`` for a part killed at its timeout).  The parts share ``--budget-s``: a part
starts only while enough of it is left, and one line names the parts that did not start.  The parts,
in order:

- ``environment``: nvidia-smi, CuPy, CUDA runtime, driver and NVRTC versions, the GPU, torch.  Where
  CuPy sees no usable GPU, the one line written says so and the script exits 0.
- ``smoke:rule=R``: every configuration of ``cuda_check.CONFIGS[R]`` on float16/bfloat16/32/64 params, a few steps
  with ``impl="fused"`` and ``impl="reference"`` on the same GPU arrays, the device synchronized after
  every step; params and state compared bit for bit and within the tolerance of tests/test_fused_gpu.py.
- ``smoke8:rule=R``: the same for the 8-bit state's kernel (``xopt_step8``, :mod:`xopt.engines.cuda_blockwise`):
  each configuration of ``cuda_check.CONFIGS[R]`` of an optimizer that takes ``state_dtype="8bit"`` (those it
  refuses are listed as skipped), with ``min_8bit_size=1`` and the default ``block_size``, ``impl="fused"`` against
  ``impl="reference"`` on the same GPU arrays; params, codes and absmax compared bit for bit.
- ``self-check:rule=R``: ``cuda_check.self_check(R, dtype)`` for each param dtype (and "DTYPE/8bit", the 8-bit
  state's kernel, for the rules that have one), its verdict.
- ``timing:CASE:DTYPE[:STATE]``: Adam with new grads every step (float32 state, or 8-bit or bfloat16), against a
  device-to-device copy of as many bytes as the step moves and torch's fused Adam: the kernels' time (CUDA events around each launch), the step's
  span on the GPU (events around ``update()``) and ``update()``'s host time; medians over repetitions after
  warm-up, GB/s, fractions of the copy's bandwidth.
- ``host``: ``update()``'s host time at 1 to 10,000 small tensors beside torch's fused Adam.
- ``torch-cuda``: torch CUDA tensors through the lane (their addresses, torch's current stream), float32 and
  float16, bit for bit the reference rule on host copies; Adam's step on GPT-2-small-like tensors against
  torch's fused Adam.
- ``rules``: the whole-tensor rules (Muon, Adafactor, LAMB, ScheduleFreeAdamW: their reference rules on CuPy) beside
  torch.optim's Muon and Adafactor; Muon's Newton-Schulz chain stacked against one matrix at a time, in FLOP/s.
- ``profile``: cProfile of ``update()``'s host time on CuPy arrays and torch CUDA tensors, to the log.
- ``tests``: ``pytest -m gpu tests`` under a timeout, in several processes where pytest-xdist is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
JSONL, LOG = "first-gpu.jsonl", "first-gpu.log"
NO_GPU = 3  # a part's exit code: no usable GPU (the environment part)
CHECK_FAILED = 2  # a part's exit code: it ran, and some of its lines are not ok
RULES = range(11)  # the CUDA kernel's rules (xopt.engines.kernels.CUDA_RULES; tests/test_first_gpu.py holds them equal)
RULES8 = (0, 1, 2, 3, 4, 9)  # those with 8-bit state (xopt.engines.cuda_blockwise.RULES8; held equal there too)

# ---------------------------------------------------------------------------------------------------------------
# The runner: this process imports no CUDA library; each part is a child process.


class JsonLines:
    """Appends one JSON object per line to ``path``; each line is on disk when ``write`` returns."""

    def __init__(self, path):
        self.path = Path(path)

    def write(self, record: dict) -> dict:
        line = json.dumps(record, default=str, allow_nan=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
        return record

    def read(self) -> list:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    argv: tuple  # the command of its process
    timeout_s: float


def child(func: str, timeout_s: float, **kwargs) -> Part:
    """A part that runs ``func`` of this file (one of ``part_*``) in a child process."""
    return Part(func.removeprefix("part_").replace("_", "-") + "".join(f":{k}={v}" for k, v in kwargs.items()),
                (sys.executable, str(Path(__file__).resolve()), "--child", func, "--kwargs", json.dumps(kwargs)),
                timeout_s)


TIMING = [("1x2^28", "float32", None), ("1000x4k-1M", "float32", None), ("10000x64-4096", "float32", None),
          ("1x2^28", "float16", None), ("10000x64-4096", "float16", None),
          ("1x2^28", "float32", "8bit"), ("1x2^28", "float32", "bfloat16")]  # (case, param dtype, Adam's state_dtype)


def _timing_kwargs(case, dtype, state) -> dict:
    return dict(case=case, dtype=dtype, **({"state": state} if state else {}))


def plan() -> list:
    """Every part, in the order they run."""
    return ([child("part_environment", 60)]
            + [child("part_smoke", 120, rule=r) for r in RULES]  # the first builds numba's cache: the longest
            + [child("part_smoke8", 120, rule=r) for r in RULES8]
            + [child("part_self_check", 90, rule=r) for r in RULES]  # with the 8-bit cases: up to eight checks
            + [child("part_timing", 90, **_timing_kwargs(*t)) for t in TIMING]
            + [child("part_host", 90)]
            + [child("part_torch_cuda", 90)]
            + [child("part_profile", 90)]
            + [child("part_rules", 120)]
            + [child("part_tests", 600)])  # what is left of the budget


def _kill(proc):
    """End ``proc`` and every process it started (its own process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def run_part(part: Part, out: Path, timeout_s: float) -> dict:
    """Run one part under ``timeout_s``; returns its end line (not yet written).  Its output goes to the log."""
    env = {**os.environ, "FIRST_GPU_JSONL": str(out / JSONL), "FIRST_GPU_OUT": str(out), "FIRST_GPU_PART": part.name,
           "FIRST_GPU_TIMEOUT_S": f"{timeout_s:.1f}", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))}
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(part.argv, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=ROOT, start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill(proc)
            timed_out = True
        seconds = time.monotonic() - t0
        output.seek(0)
        text = output.read().decode(errors="replace")
    rc = proc.returncode
    with open(out / LOG, "a") as log:
        log.write(f"===== {part.name}: exit code {rc}{', timed out' if timed_out else ''}, {seconds:.1f} s\n{text}\n")
    end = {"part": part.name, "end": True, "ok": rc == 0 and not timed_out, "seconds": round(seconds, 2), "rc": rc}
    if timed_out:
        end.update(timed_out=True, error=f"timed out after {timeout_s:.0f} s")
    elif rc == NO_GPU:
        end.update(no_gpu=True, error=f"no GPU found: {text.strip().splitlines()[-1] if text.strip() else '?'}")
    elif rc == CHECK_FAILED:
        end["error"] = "it ran; some of its checks failed (its other lines say which)"
    elif rc < 0:
        end["error"] = f"killed by {signal.Signals(-rc).name}"
    elif rc != 0:
        end["error"] = f"exit code {rc}"
    if not end["ok"] and text.strip():
        end["output_tail"] = text[-1500:]
    return end


def run_parts(parts, out, budget_s: float, min_start_s: float = 5.0, echo=print) -> dict:
    """Run ``parts`` in order within ``budget_s``; every line to ``out/first-gpu.jsonl``.  Returns the summary
    line (also written), or the environment part's line where no GPU was found (the only line written then)."""
    out = Path(out).absolute()  # the parts run in the repository's root: a relative --out would be another folder there
    out.mkdir(parents=True, exist_ok=True)
    lines = JsonLines(out / JSONL)
    t0 = time.monotonic()
    deadline = t0 + budget_s
    status = {}
    for i, part in enumerate(parts):
        left = deadline - time.monotonic()
        if left < min_start_s:
            rest = [p.name for p in parts[i:]]
            lines.write({"part": "budget", "ok": False, "skipped": rest,
                         "error": f"the budget of {budget_s:.0f} s is spent: {len(rest)} parts not started"})
            status.update((name, "not started") for name in rest)
            echo(f"{time.monotonic() - t0:7.1f} s  budget spent: {len(rest)} parts not started")
            break
        end = run_part(part, out, min(part.timeout_s, left))
        if end.get("no_gpu"):
            end.pop("end"), end.pop("output_tail", None)
            echo(f"{end['error']}")
            return lines.write(end)
        lines.write(end)
        status[part.name] = ("ok" if end["ok"] else "timed out" if end.get("timed_out") else "failed")
        echo(f"{time.monotonic() - t0:7.1f} s  {part.name:<32} {status[part.name]:<10} {end['seconds']:6.1f} s"
             + (f"  {end['error']}" if not end["ok"] else ""))
    summary = {"part": "summary", "ok": all(s == "ok" for s in status.values()), "parts": status,
               "seconds": round(time.monotonic() - t0, 1), "budget_s": budget_s}
    return lines.write(summary)


def select(parts, names: str | None) -> list:
    """The parts whose names start with one of the comma-separated ``names`` (all where None); the environment
    part always, first."""
    if not names:
        return list(parts)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    return [p for p in parts if p.name == "environment" or any(p.name.startswith(w) for w in wanted)]


def report(out, echo=print):
    """A short table of the timings, from the lines written."""
    for r in JsonLines(Path(out) / JSONL).read():
        if r["part"].startswith("timing:") and "impl" in r:
            echo(f"{r['part']:<28} {r['impl']:<12} kernel {r.get('kernel_ms', float('nan')):8.3f} ms  "
                 f"span {r['span_ms']:8.3f} ms  host {r['host_ms']:7.3f} ms  {r['span_GBps']:7.0f} GB/s  "
                 f"{r['span_of_copy']:5.2f} of copy (kernel {r.get('kernel_of_copy', float('nan')):4.2f})")
        elif r["part"] == "host" and "tensors" in r:
            echo(f"host {r['tensors']:>6} tensors: xopt {r['xopt_us']:9.1f} us, torch fused "
                 f"{r.get('torch_fused_us', float('nan')):9.1f} us, target {r['target_us']:.0f} us")
        elif r["part"] == "rules" and "xopt_ms" in r:
            echo(f"rules {r['rule']:<18} xopt {r['xopt_ms']:8.2f} ms  torch {r.get('torch_ms', float('nan')):8.2f} ms")
        elif r["part"] == "rules" and "stacked_ms" in r:
            echo(f"rules Newton-Schulz {r['matrices']} x {r['shape']}: stacked {r['stacked_ms']:.2f} ms, one at a time "
                 f"{r['one_at_a_time_ms']:.2f} ms, {r['stacked_TFLOPs']:.1f} TFLOP/s")
        elif r["part"] == "tests" and "tests" in r:
            echo(f"tests: {r['tests']} run, {r['failures']} failed, {r['errors']} errors, {r['skipped']} skipped")


# ---------------------------------------------------------------------------------------------------------------
# In a child process: writing its lines.

_FAILED = []


def emit(**fields) -> dict:
    """Write one line of this part (``ok`` true unless given)."""
    record = {"part": os.environ.get("FIRST_GPU_PART", "?"), "ok": True, **fields}
    if not record["ok"]:
        _FAILED.append(record)
    return JsonLines(os.environ["FIRST_GPU_JSONL"]).write(record)


def _run_child(func, kwargs):
    try:
        globals()[func](**kwargs)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001  (a part's failure is a line, then the exit code)
        traceback.print_exc()
        emit(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:])
        raise SystemExit(1)
    raise SystemExit(CHECK_FAILED if _FAILED else 0)


# ---------------------------------------------------------------------------------------------------------------
# The parts.


def part_environment():
    """Versions and the GPU; exits NO_GPU (printing why) where CuPy has no GPU it can run a kernel on."""
    import platform
    import shutil

    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
        if n == 0:
            raise RuntimeError("CUDA reports 0 devices")
        assert int(cupy.arange(10).sum()) == 45, "a CuPy kernel gave a wrong sum"
    except Exception as exc:  # noqa: BLE001  (not installed, no driver, no device, a broken one)
        print(f"CuPy has no usable GPU: {type(exc).__name__}: {exc}")
        raise SystemExit(NO_GPU)
    import numpy as np

    rt = cupy.cuda.runtime
    props = rt.getDeviceProperties(0)
    name = props.get("name", b"?")
    free, total = rt.memGetInfo()
    info = dict(python=platform.python_version(), machine=platform.machine(), numpy=np.__version__,
                cupy=cupy.__version__, cuda_runtime=rt.runtimeGetVersion(), cuda_driver=rt.driverGetVersion(),
                nvrtc=".".join(map(str, cupy.cuda.nvrtc.getVersion())), gpus=n,
                gpu=name.decode(errors="replace") if isinstance(name, bytes) else name,
                compute_capability=f"{props.get('major')}.{props.get('minor')}", sms=props.get("multiProcessorCount"),
                l2_mib=props.get("l2CacheSize", 0) / 2**20, memory_gib=round(total / 2**30, 1),
                memory_free_gib=round(free / 2**30, 1), cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    if shutil.which("nvidia-smi"):
        query = ("name,driver_version,memory.total,memory.used,compute_cap,clocks.sm,clocks.max.sm,clocks.mem,"
                 "power.draw,power.limit,temperature.gpu,persistence_mode")
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True,
                             timeout=20)
        info["nvidia_smi"] = (smi.stdout or smi.stderr).strip().splitlines()
    for name in ("numba", "torch"):
        try:
            module = __import__(name)
            info[name] = module.__version__
        except Exception as exc:  # noqa: BLE001
            info[name] = f"not importable: {exc!r}"
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info.update(torch_cuda=torch.version.cuda, torch_sees_gpu=torch.cuda.is_available())
    import xopt
    from xopt.engines import fused_cuda

    info.update(xopt=getattr(xopt, "__version__", "?"), verified=fused_cuda.VERIFIED,
                compiled_gather=fused_cuda.cuda_memory is not None, chunk=fused_cuda.CHUNK,
                threads=fused_cuda.THREADS, options=fused_cuda.OPTIONS)
    emit(**info)


# tests/test_fused_gpu.py's tolerances (its close comparison)
TOL = {"float16": dict(rtol=2e-3, atol=1e-3), "bfloat16": dict(rtol=1.6e-2, atol=8e-3),
       "float32": dict(rtol=1e-5, atol=1e-6), "float64": dict(rtol=1e-13, atol=1e-14)}


def _compare(ours, ref, dtype):
    """(bit for bit, within TOL, largest absolute difference) of two NumPy arrays; any NaN equals any NaN."""
    import numpy as np

    ours, ref = ours.reshape(-1), ref.reshape(-1)
    both_nan = np.isnan(ours) & np.isnan(ref)
    bits = f"u{ref.dtype.itemsize}"
    same = bool(((ours.view(bits) == ref.view(bits)) | both_nan).all())
    with np.errstate(all="ignore"):
        diff = np.where(both_nan, 0, np.abs(ours.astype(np.float64) - ref.astype(np.float64)))
    close = bool(np.allclose(ours, ref, equal_nan=True, **TOL[dtype]))
    return same, close, float(diff.max()) if diff.size else 0.0


def _twin_steps(ref, ours, shapes, kind, rng, n):
    """Params of ``shapes`` (``kind``) drawn from ``rng``, one copy on the GPU for each optimizer, and ``n`` steps of
    both on the same grads, each step synchronized; returns (the host params, ref's GPU params, ours')."""
    import cupy

    host = {f"t{i}": rng.standard_normal(s).astype(kind) for i, s in enumerate(shapes)}
    a = {k: cupy.asarray(v) for k, v in host.items()}
    b = {k: cupy.asarray(v) for k, v in host.items()}
    for _ in range(n):
        g = {k: cupy.asarray((rng.standard_normal(v.shape) + 0.1).astype(kind)) for k, v in host.items()}
        ref.update(a, g)
        cupy.cuda.Device().synchronize()
        ours.update(b, g)
        cupy.cuda.Device().synchronize()
    return host, a, b


def part_smoke(rule: int, steps: int = 3):
    """Every configuration of the rule's self-check list, each param dtype: fused against reference, same GPU."""
    import cupy
    import numpy as np

    import xopt
    from xopt.engines import cuda_check, fused_cuda

    from xopt import _backend

    shapes = [(1000,), (3, 5), (2 * fused_cuda.CHUNK + 9,)]
    for dtype in fused_cuda.PTYPES:
        kind = _backend.low_precision_dtype(np, dtype) if dtype == "bfloat16" else np.dtype(dtype)  # ml_dtypes'
        t0, results = time.perf_counter(), []
        for name, hyper, *n_steps in cuda_check.CONFIGS[rule]:
            label = f"{name}({', '.join(f'{k}={v!r}' for k, v in hyper.items())})"
            rng = np.random.default_rng(rule)
            try:
                ref = getattr(xopt, name)(impl="reference", **hyper)
                ours = getattr(xopt, name)(impl="fused", **hyper)
                n = max(steps, n_steps[0] if n_steps else 0)
                host, a, b = _twin_steps(ref, ours, shapes, kind, rng, n)
                pairs = [(b[k], a[k]) for k in host] + [(ours.state[k][s], ref.state[k][s])
                                                        for k in host for s in ref.buffers()]
                checks = [_compare(cupy.asnumpy(x), cupy.asnumpy(y), dtype) for x, y in pairs]
                results.append(dict(config=label, steps=n, bitwise=all(c[0] for c in checks),
                                    within_tol=all(c[1] for c in checks), max_abs_diff=max(c[2] for c in checks)))
            except Exception as exc:  # noqa: BLE001  (the next configuration still runs)
                results.append(dict(config=label, within_tol=False, error=f"{type(exc).__name__}: {exc}"))
        emit(ok=all(r["within_tol"] for r in results), dtype=dtype, kernel=fused_cuda.kernel_name(rule, dtype),
             bitwise=all(r.get("bitwise", False) for r in results), configs=results,
             seconds=round(time.perf_counter() - t0, 2))


def part_smoke8(rule: int, steps: int = 3):
    """8-bit state (``state_dtype="8bit"``): the CUDA 8-bit kernel against the reference rule, same GPU, bit for bit
    (params, codes, absmax)."""
    import cupy
    import numpy as np

    import xopt
    from xopt import _backend
    from xopt.engines import cuda_blockwise, cuda_check, fused_cuda

    shapes = [(1000,), (3, 5), (2 * cuda_blockwise.CHUNK8 + 9,), (300, 301)]
    for dtype in fused_cuda.PTYPES:
        kind = _backend.low_precision_dtype(np, dtype) if dtype == "bfloat16" else np.dtype(dtype)  # ml_dtypes'
        t0, results = time.perf_counter(), []
        for name, hyper, *n_steps in cuda_check.CONFIGS[rule]:
            hyper = {**hyper, "state_dtype": "8bit", "min_8bit_size": 1}
            label = f"{name}({', '.join(f'{k}={v!r}' for k, v in hyper.items())})"
            try:
                ref = getattr(xopt, name)(impl="reference", **hyper)
                ours = getattr(xopt, name)(impl="fused", **hyper)
            except (TypeError, ValueError) as exc:  # not an 8-bit configuration (SGD without momentum, ...)
                results.append(dict(config=label, skipped=f"{type(exc).__name__}: {exc}"))
                continue
            rng = np.random.default_rng(rule)
            try:
                n = max(steps, n_steps[0] if n_steps else 0)
                host, a, b = _twin_steps(ref, ours, shapes, kind, rng, n)
                pairs = [(b[k], a[k]) for k in host] + [(ours.state[k][s], ref.state[k][s])
                                                        for k in host for s in ref.state[k] if s != "step"]
                same = [np.array_equal(cupy.asnumpy(x).reshape(-1).view(np.uint8),
                                       cupy.asnumpy(y).reshape(-1).view(np.uint8))
                        or np.array_equal(cupy.asnumpy(x), cupy.asnumpy(y), equal_nan=True) for x, y in pairs]
                results.append(dict(config=label, steps=n, bitwise=all(same), differing=sum(not x for x in same)))
            except Exception as exc:  # noqa: BLE001  (the next configuration still runs)
                results.append(dict(config=label, bitwise=False, error=f"{type(exc).__name__}: {exc}"))
        run = [r for r in results if "skipped" not in r]
        emit(ok=bool(run) and all(r["bitwise"] for r in run), dtype=dtype,
             kernel=cuda_blockwise.step8_name(rule, dtype), configs=results, seconds=round(time.perf_counter() - t0, 2))


def part_self_check(rule: int):
    """cuda_check.self_check for each param dtype: what impl="auto" runs before it trusts a kernel."""
    from xopt.engines import cuda_check, fused_cuda

    cases = list(fused_cuda.PTYPES) + ([f"{d}/8bit" for d in fused_cuda.PTYPES] if rule in RULES8 else [])
    for dtype in cases:
        t0 = time.perf_counter()
        try:
            result = cuda_check.self_check(rule, dtype)
            emit(ok=result.passed, dtype=dtype, kernel=result.kernel, passed=result.passed, verdict=str(result),
                 seconds=round(time.perf_counter() - t0, 2))
        except Exception as exc:  # noqa: BLE001
            emit(ok=False, dtype=dtype, error=f"{type(exc).__name__}: {exc}")


def case_sizes(case: str, rng) -> list:
    """The tensor sizes of a timing case (of :data:`TIMING`)."""
    import numpy as np

    if case == "1x2^28":
        return [2**28]
    if case == "1000x4k-1M":  # log-uniform, as a model's layers are
        return [int(n) for n in np.exp(rng.uniform(np.log(4096), np.log(2**20), 1000)).round()]
    if case == "10000x64-4096":  # uniform, as tests/test_fused_gpu.py's many tensors
        return [int(n) for n in rng.integers(64, 4097, 10_000)]
    raise ValueError(f"no timing case {case!r}")


class _OnCupy:
    """Events on CuPy's current stream."""

    def events(self):
        return self.cp.cuda.Event(), self.cp.cuda.Event()

    def elapsed_ms(self, a, b):
        return self.cp.cuda.get_elapsed_time(a, b)

    def kernel_ms(self):
        return None


class _XoptAdam(_OnCupy):
    """xopt.Adam(impl="fused") on separate CuPy arrays; its kernels timed by events around each launch."""

    name = "xopt-fused"

    def __init__(self, cupy, sizes, dtype, state=None):
        import xopt
        from xopt.engines import fused_cuda

        self.cp, self.dtype = cupy, dtype
        self.params = {f"w{i}": self._randn(n) for i, n in enumerate(sizes)}
        self.opt = xopt.Adam(impl="fused", **({"state_dtype": state} if state else {}))
        self.grads, self.launches = None, []
        real = fused_cuda.CupyDevice.launcher

        def launcher(function, n_blocks, args):  # the launch between two events
            call = real(function, n_blocks, args)

            def timed():
                a, b = cupy.cuda.Event(), cupy.cuda.Event()
                a.record()
                call()
                b.record()
                self.launches.append((a, b))
            return timed

        fused_cuda.CupyDevice.launcher = staticmethod(launcher)

    def _randn(self, n):
        return self.cp.random.standard_normal(n, dtype=self.cp.float32).astype(self.dtype, copy=False)

    def new_grads(self):
        self.grads = None
        self.grads = {k: self._randn(p.size) for k, p in self.params.items()}

    def step(self):
        self.launches.clear()
        self.opt.update(self.params, self.grads)

    def kernel_ms(self):
        return sum(self.cp.cuda.get_elapsed_time(a, b) for a, b in self.launches)

    def moved_bytes(self):  # param read and written, grad read, each state array read and written (8-bit: codes, scales)
        p = sum(v.nbytes for v in self.params.values())
        return 3 * p + 2 * sum(v.nbytes for k in self.params for v in self.opt.state[k].values() if hasattr(v, "nbytes"))


class _TorchAdam:
    """torch.optim.Adam(fused=True) on the same sizes."""

    name = "torch-fused"

    def __init__(self, torch, sizes, dtype):
        self.torch = torch
        self.params = [torch.randn(n, device="cuda", dtype=getattr(torch, dtype)) for n in sizes]
        self.opt = torch.optim.Adam(self.params, lr=1e-3, fused=True)

    def new_grads(self):
        for p in self.params:
            p.grad = None
        for p in self.params:
            p.grad = self.torch.randn_like(p)

    def events(self):
        return self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)

    def elapsed_ms(self, a, b):
        return a.elapsed_time(b)

    def step(self):
        self.opt.step()

    def kernel_ms(self):
        return None

    def moved_bytes(self):
        p = sum(t.nbytes for t in self.params)
        state = self.opt.state.values()
        return 3 * p + 2 * sum(s["exp_avg"].nbytes + s["exp_avg_sq"].nbytes for s in state)


class _Copy(_OnCupy):
    """One device-to-device copy (cudaMemcpyAsync) of random numbers that reads and writes ``moved`` bytes."""

    name = "copy"

    def __init__(self, cupy, moved):
        self.cp = cupy
        self.src = cupy.random.standard_normal(moved // 8, dtype=cupy.float32)  # moved / 2 bytes
        self.dst = cupy.empty_like(self.src)

    def new_grads(self):
        pass

    def step(self):
        self.dst.data.copy_from_device_async(self.src.data, self.src.nbytes)

    def moved_bytes(self):
        return 2 * self.src.nbytes


def part_timing(case: str, dtype: str, state: str | None = None, warmup: int = 3, repeat: int = 15):
    """Adam with new grads every step (``state``: its state_dtype) against a copy of its bytes and torch's fused Adam
    (float32 state); medians."""
    import cupy
    import numpy as np

    sizes = case_sizes(case, np.random.default_rng(0))
    impls = [_XoptAdam(cupy, sizes, dtype, state)]
    impls[0].new_grads()
    impls[0].step()  # its state exists: its bytes are known
    impls.append(_Copy(cupy, impls[0].moved_bytes()))
    try:
        import torch

        if torch.cuda.is_available():
            impls.append(_TorchAdam(torch, sizes, dtype))
    except ImportError:
        pass
    samples = {impl.name: [] for impl in impls}
    for r in range(warmup + repeat):
        for impl in impls[r % len(impls):] + impls[:r % len(impls)]:  # the order rotated each round
            impl.new_grads()
            cupy.cuda.Device().synchronize()
            a, b = impl.events()
            a.record()
            t0 = time.perf_counter()
            impl.step()
            host = time.perf_counter() - t0
            b.record()
            b.synchronize()
            if r >= warmup:
                samples[impl.name].append((impl.elapsed_ms(a, b), impl.kernel_ms(), host * 1e3))
    copy_span = statistics.median(s[0] for s in samples["copy"])
    copy_GBps = impls[1].moved_bytes() / copy_span / 1e6
    for impl in impls:
        span, kernel, host = (statistics.median(x) if None not in x else None for x in zip(*samples[impl.name]))
        moved = impl.moved_bytes()
        line = dict(impl=impl.name, tensors=len(sizes), elements=int(sum(sizes)), dtype=dtype,
                    state=state if impl.name == "xopt-fused" else None, bytes=moved,
                    span_ms=span, span_min_ms=min(s[0] for s in samples[impl.name]), host_ms=host,
                    span_GBps=moved / span / 1e6, span_of_copy=moved / span / 1e6 / copy_GBps, repeat=repeat)
        if kernel:  # xopt's: its launches alone
            line.update(kernel_ms=kernel, kernel_GBps=moved / kernel / 1e6,
                        kernel_of_copy=moved / kernel / 1e6 / copy_GBps)
        emit(**line)


def part_host(counts=(1, 100, 1000, 10000), elements: int = 256, warmup: int = 5, steps: int = 40):
    """update()'s host time (the call's return, the GPU idle before it) at ``counts`` tensors of ``elements``
    float32, grads rotating among three sets of arrays; torch's fused Adam beside it.  Medians in us."""
    import cupy

    import xopt

    try:
        import torch

        torch = torch if torch.cuda.is_available() else None
    except ImportError:
        torch = None

    def median_us(step, prepare, sync):
        times = []
        for i in range(warmup + steps):
            prepare(i)
            sync()
            t0 = time.perf_counter()
            step(i)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)

    for n in counts:
        params = {f"w{i}": cupy.random.standard_normal(elements, dtype=cupy.float32) for i in range(n)}
        grads = [{k: cupy.random.standard_normal(elements, dtype=cupy.float32) for k in params} for _ in range(3)]
        opt = xopt.Adam(impl="fused")
        line = dict(tensors=n, elements=elements, target_us=30 + n,
                    xopt_us=median_us(lambda i: opt.update(params, grads[i % 3]), lambda i: None,
                                      cupy.cuda.Device().synchronize))
        if torch is not None:
            tp = [torch.randn(elements, device="cuda") for _ in range(n)]
            tg = [[torch.randn(elements, device="cuda") for _ in range(n)] for _ in range(3)]
            topt = torch.optim.Adam(tp, lr=1e-3, fused=True)

            def set_grads(i):
                for p, g in zip(tp, tg[i % 3]):
                    p.grad = g

            line["torch_fused_us"] = median_us(lambda i: topt.step(), set_grads, torch.cuda.synchronize)
        emit(**line)


def _junit_counts(path):
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            found = case.find(tag)
            if found is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}: {(found.get('message') or '')[:300]}")
    return counts, failed


def part_torch_cuda(steps: int = 5, repeat: int = 20):
    """torch CUDA tensors through the lane (their addresses, torch's current stream): Adam on a few float32 and float16
    shapes, after the first step bit for bit the reference rule on host copies of the same params and state, each
    later step taken by the lane with one launch; then ``update()`` time against torch's fused Adam on the same
    tensors (events around each, fresh grads every step)."""
    import numpy as np
    import torch

    import xopt
    from xopt import _lane

    if not torch.cuda.is_available():
        emit(ok=False, error="torch sees no GPU")
        return
    took, real = [], _lane.take

    def take(opt, params, grads):  # what the lane answered for xopt's fused optimizer (not the reference twin)
        answer = real(opt, params, grads)
        if opt.impl != "reference":
            took.append(answer)
        return answer

    _lane.take = take
    shapes = [(1000,), (3, 5), (768, 768), (2 * 16384 + 9,), ()]
    for dtype in (torch.float32, torch.float16):
        g = torch.Generator(device="cuda").manual_seed(0)
        b = {f"t{i}": torch.randn(s, device="cuda", generator=g).to(dtype) for i, s in enumerate(shapes)}
        grads = [{k: (torch.randn(v.shape, device="cuda", generator=g) + 0.1).to(dtype) for k, v in b.items()}
                 for _ in range(steps)]
        ours = xopt.Adam()
        ours.update(b, grads[0])
        ref = xopt.Adam(impl="reference")
        a = {k: v.cpu().numpy() for k, v in b.items()}
        ref.state = {k: {n: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for n, v in st.items()}
                     for k, st in ours.state.items()}
        ref.iter = ours.iter
        took.clear()
        for gs in grads[1:]:
            ref.update(a, {k: v.cpu().numpy() for k, v in gs.items()})
            ours.update(b, gs)
        torch.cuda.synchronize()
        name = str(dtype)[6:]
        checks = [_compare(b[k].cpu().numpy(), a[k], name) for k in a]
        checks += [_compare(ours.state[k][n].cpu().numpy(), ref.state[k][n], name) for k in a for n in ("m", "v")]
        emit(ok=all(took) and all(c[0] for c in checks), dtype=name, lane_steps=sum(took), steps=len(took),
             bitwise=all(c[0] for c in checks), within_tol=all(c[1] for c in checks),
             max_abs_diff=max(c[2] for c in checks))
    sizes = [768 * 768] * 24 + [768 * 3072] * 24 + [768] * 100  # GPT-2-small-like tensors
    params = [torch.randn(n, device="cuda") for n in sizes]
    twins = [p.clone().requires_grad_() for p in params]
    grads = [[torch.randn(n, device="cuda") for n in sizes] for _ in range(3)]
    ours, theirs = xopt.Adam(), torch.optim.Adam(twins, fused=True)
    keyed = {f"p{i}": p for i, p in enumerate(params)}
    times = {"xopt": [], "torch_fused": []}
    for i in range(repeat + 2):
        gs = grads[i % 3]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        ours.update(keyed, {f"p{j}": x for j, x in enumerate(gs)})
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            times["xopt"].append(start.elapsed_time(end))
        for t, x in zip(twins, gs):
            t.grad = x
        start.record()
        theirs.step()
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            times["torch_fused"].append(start.elapsed_time(end))
    med = {k: float(np.median(v)) for k, v in times.items()}
    emit(case="Adam, GPT-2-small-like float32 tensors", tensors=len(sizes), ms=med,
         xopt_over_torch_fused=med["xopt"] / med["torch_fused"], lane_steps=sum(took[-repeat:]))


def part_profile(top: int = 25):
    """Where ``update()``'s host time goes: cProfile of a few steps on CuPy arrays (1 tensor of 256 float32, 1 of 2^28,
    1,000 tensors of 4k-1M) and on torch CUDA tensors (GPT-2-small-like); the top functions by own time to the log, the
    first ten in a line each."""
    import cProfile
    import io
    import pstats

    import cupy
    import numpy as np

    import xopt

    def profile(name, step, steps=10):
        for _ in range(3):
            step()
        cupy.cuda.Device().synchronize()
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(steps):
            step()
        prof.disable()
        host_ms = (time.perf_counter() - t0) / steps * 1e3
        cupy.cuda.Device().synchronize()
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("tottime").print_stats(top)
        print(f"----- {name}: {host_ms:.3f} ms per update under cProfile\n{text.getvalue()}")
        rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:10]
        emit(case=name, host_ms_profiled=host_ms, steps=steps,
             top=[dict(function=f"{f[0].rsplit('/', 1)[-1]}:{f[1]}:{f[2]}", calls=v[1], own_ms=v[2] / steps * 1e3,
                       cumulative_ms=v[3] / steps * 1e3) for f, v in rows])

    rng = np.random.default_rng(0)
    for case in ("1x256", "1x2^28", "1000x4k-1M"):  # the fixed cost of a step; one large tensor; many
        sizes = [256] if case == "1x256" else case_sizes(case, rng)
        params = {f"w{i}": cupy.random.standard_normal(n, dtype=cupy.float32) for i, n in enumerate(sizes)}
        grads = {k: cupy.random.standard_normal(p.size, dtype=cupy.float32) for k, p in params.items()}
        opt = xopt.Adam()
        profile(f"cupy {case} float32", lambda: opt.update(params, grads))
        del params, grads, opt
    try:
        import torch
    except ImportError:
        return
    sizes = [768 * 768] * 24 + [768 * 3072] * 24 + [768] * 100
    params = {f"p{i}": torch.randn(n, device="cuda") for i, n in enumerate(sizes)}
    grads = {k: torch.randn(n, device="cuda") for k, n in zip(params, sizes)}
    opt = xopt.Adam()
    profile("torch GPT-2-small-like float32", lambda: opt.update(params, grads))


RULES_SHAPES = [(768, 768)] * 12 + [(768, 3072)] * 4 + [(3072, 768)] * 4 + [(768,)] * 24  # a few GPT-2 blocks' shapes


def rule_timings(xp, sync, torch=None, device=None, shapes=RULES_SHAPES, warmup=2, repeat=7):
    """The whole-tensor rules (Muon, Adafactor, LAMB, ScheduleFreeAdamW) on ``xp`` float32 arrays of ``shapes``, new
    grads every step: medians of ``update()`` in ms (``sync()`` after each, host clocks), each beside torch.optim's own
    (Muon, Adafactor) on ``device`` where ``torch`` is given; and Muon's Newton-Schulz chain on the 768x768 matrices,
    stacked against one at a time, with its FLOP/s (5 iterations of X Xᵀ, A Aᵀ and B X)."""
    import numpy as np

    from array_api_compat import array_namespace

    import xopt
    from xopt.optimizers.muon import NS_COEFFICIENTS, orthogonalize

    rng = np.random.default_rng(0)
    host = [rng.standard_normal(s).astype(np.float32) for s in shapes]

    def timed(step, grads):
        times = []
        for i in range(warmup + repeat):
            sync()
            t0 = time.perf_counter()
            step(grads[i % len(grads)])
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    rows = []
    made = {"Muon": dict(lr=0.02), "Adafactor": dict(lr=0.01), "LAMB": dict(lr=0.01, weight_decay=0.01),
            "ScheduleFreeAdamW": dict(lr=0.01)}
    grads = [{f"p{i}": xp.asarray(rng.standard_normal(s).astype(np.float32)) for i, s in enumerate(shapes)}
             for _ in range(3)]
    for name, hyper in made.items():
        params = {f"p{i}": xp.asarray(h) for i, h in enumerate(host)}
        opt = getattr(xopt, name)(**hyper)
        row = dict(rule=name, tensors=len(shapes), elements=int(sum(h.size for h in host)),
                   xopt_ms=timed(lambda g: opt.update(params, g), grads))
        theirs = getattr(torch.optim, name, None) if torch is not None and name in ("Muon", "Adafactor") else None
        if theirs is not None:
            ts = [torch.tensor(h, device=device, requires_grad=True) for h in host]
            if name == "Muon":  # torch.optim.Muon takes 2-D params only: the others go to AdamW, as xopt's Muon does
                two, rest = [t for t in ts if t.ndim == 2], [t for t in ts if t.ndim != 2]
                opts = [theirs(two, lr=0.02), torch.optim.AdamW(rest, lr=0.02)]
            else:
                opts = [theirs(ts, lr=0.01)]
            tgrads = [[torch.tensor(np.asarray(_host(g[f"p{i}"])), device=device) for i in range(len(ts))]
                      for g in grads]

            def torch_step(gs):
                for t, gr in zip(ts, gs):
                    t.grad = gr
                for o in opts:
                    o.step()
            row["torch_ms"] = timed(torch_step, tgrads)
        rows.append(row)
    shape = max({h.shape for h in host if h.ndim == 2}, key=lambda s: sum(h.shape == s for h in host))
    square = [h for h in host if h.shape == shape]  # the most frequent matrix shape: GPT-2's 768x768
    stack = xp.asarray(np.stack(square))
    one = [xp.asarray(h) for h in square]
    xp = array_namespace(stack)  # the standard's namespace of the library (matrix_transpose, clip's min=)
    stacked_ms = timed(lambda _: orthogonalize(xp, stack, NS_COEFFICIENTS, 5, 1e-7), [None])
    each_ms = timed(lambda _: [orthogonalize(xp, m, NS_COEFFICIENTS, 5, 1e-7) for m in one], [None])
    n = min(shape)  # flops of a chain on an R x C matrix, R <= C: 5 x (2R^2C + 2R^3 + 2R^2C)
    flops = len(square) * 5 * (4 * n * n * max(shape) + 2 * n ** 3)
    rows.append(dict(rule="Muon Newton-Schulz", matrices=len(square), shape=list(shape), stacked_ms=stacked_ms,
                     one_at_a_time_ms=each_ms, stacked_speedup=each_ms / stacked_ms,
                     stacked_TFLOPs=flops / stacked_ms / 1e9))
    return rows


def _host(a):
    """A NumPy copy of ``a`` (a CuPy array, or NumPy already)."""
    get = getattr(a, "get", None)
    return get() if get is not None else a


def part_rules():
    """:func:`rule_timings` on CuPy arrays beside torch.optim on CUDA, one line each."""
    import cupy

    try:
        import torch
        if not torch.cuda.is_available():
            torch = None
    except ImportError:
        torch = None
    for row in rule_timings(cupy, cupy.cuda.Device().synchronize, torch, "cuda"):
        emit(**row)


def part_tests(margin_s: float = 15):
    """pytest -m gpu over tests/, stopped before this part's own timeout so that its counts are still written."""
    import importlib.util
    import re

    out = Path(os.environ["FIRST_GPU_OUT"])
    timeout = float(os.environ.get("FIRST_GPU_TIMEOUT_S", 600)) - margin_s
    xml, txt = out / "gpu-tests.xml", out / "gpu-tests.txt"
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "gpu", "tests",
           f"--junitxml={xml}", "-o", "faulthandler_timeout=120", "--continue-on-collection-errors", "-rfE"]
    if importlib.util.find_spec("pytest_timeout"):
        cmd += ["--timeout", "180"]
    if importlib.util.find_spec("xdist") and (os.cpu_count() or 1) >= 4:  # one GPU serves several processes
        cmd += ["-n", str(min(8, os.cpu_count() // 2)),  # pytest-benchmark's warning that xdist disables it:
                "-W", "ignore::pytest_benchmark.logger.PytestBenchmarkWarning"]  # an error under filterwarnings
    t0 = time.monotonic()
    with open(txt, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            proc.wait(timeout=max(timeout, 1))
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill(proc)
            timed_out = True
    line = dict(rc=proc.returncode, seconds=round(time.monotonic() - t0, 1), command=" ".join(cmd[2:]))
    if xml.exists() and not timed_out:
        counts, failed = _junit_counts(xml)
        line.update(counts, failed=failed[:40])
    else:  # killed: count what -v printed
        text = txt.read_text(errors="replace")
        words = re.findall(r" (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", text)
        line.update(tests=len(words), failures=words.count("FAILED"), errors=words.count("ERROR"),
                    skipped=words.count("SKIPPED"), failed=["".join(m) for m in re.findall(r"FAILED (\S+::\S+)|^(\S+::\S+) FAILED", text, re.M)][:40])
    if timed_out:
        line["error"] = f"pytest stopped after {timeout:.0f} s (counts from its output so far)"
    emit(ok=not timed_out and line["tests"] > 0 and line["failures"] == line["errors"] == 0, **line)


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder for the results")
    parser.add_argument("--budget-s", type=float, default=480, help="seconds for all parts together")
    parser.add_argument("--parts", help="comma-separated name prefixes (smoke,timing:1x2^28,...); default all")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # in a part's process: the function it runs
    parser.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sys.path.insert(0, str(ROOT))
        _run_child(args.child, json.loads(args.kwargs))
    out = Path(args.out)
    summary = run_parts(select(plan(), args.parts), out, args.budget_s)
    if not summary.get("no_gpu"):
        report(out)
        print(f"{'all parts ok' if summary['ok'] else 'NOT all parts ok'}; lines in {out / JSONL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
