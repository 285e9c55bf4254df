"""The CUDA kernel's self-check: the kernel and the reference rule side by side on one GPU, bit for bit.

While ``fused_cuda.VERIFIED`` is False (one GPU model, an H200, has run the GPU tests), ``impl="auto"`` runs the
CUDA kernel for a (GPU, rule, param dtype) only after :func:`self_check` has passed there.  The check runs
in a child process (:func:`in_child`: a new Python, never a fork of this one's CUDA context), once per GPU,
driver, kernel source (with NVRTC, CuPy and xopt's options), rule and dtype: its verdict is kept on disk
(:mod:`xopt.engines.cuda_cache`) and read there by later processes, which start no child.  So a kernel
that faults or hangs takes the child down, never the user's process, whose CUDA context stays intact and
which has loaded no kernel before the verdict.  A failure warns once per process (:class:`SelfCheckWarning`,
naming the case) and that (GPU, rule, dtype) keeps the reference rule.  What is the kernel's own (a mismatch,
a fault the kernel's launch left: an illegal or misaligned address, a launch failure, or the child killed by a
signal) is kept on disk for later processes; what may pass another time (any other error, such as running
out of memory beside the user's process, a child past :data:`TIMEOUT`, one that cannot run the check at all
or is stopped from outside: Ctrl-C, SIGTERM, the OOM killer's SIGKILL) fails it for this process only.  Anyone can call
:func:`self_check` (in their own process) and read its result; :data:`RESULTS` holds those that
``impl="auto"`` used.

What one check runs: each configuration of :data:`CONFIGS` that uses the rule (together they take
every branch of its element function; the last one with ``clip_grad_norm``; for a case of bfloat16 state,
"float32/bfloat16" (:func:`fused_cuda.case_name`), each with ``state_dtype="bfloat16"``; for a case of 8-bit state,
"float32/8bit", those of its optimizers that take ``state_dtype="8bit"``, with it and ``min_8bit_size=1``: the
kernel of :mod:`xopt.engines.cuda_blockwise`, its codes and absmax compared too), on six tensors in
one launch per step, two steps (SGD's first step differs; RAdam seven, as it rectifies from step 6): a
scalar, an empty tensor, 15 elements (a 128-bit group and a scalar tail), 37 elements with the param and then the grad offset
by one element (not 16-byte aligned: the scalar path), and one more than two chunks' worth spread
over two blocks.  Params standard normal,
grads standard normal + 0.1 with a -0.0 and (step 2) a NaN; with ``clip_grad_norm``, rounded to multiples of
1/64, so that the norm is exact whatever order a sum takes (the kernel's norm pass and CuPy's reduction add in
different orders).  Every param and state element must
have the reference's bits (any NaN equals any NaN).  Subnormals are left out: CuPy builds the
reference's elementwise kernels with -ftz=true, xopt's kernel keeps them (as NumPy does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np

from .. import _backend
from . import cuda_cache, fused_cuda
from .kernels import lookup

__all__ = ["CONFIGS", "configs_for", "RESULTS", "SelfCheck", "SelfCheckWarning", "self_check", "verdict", "in_child",
           "CHECK", "TIMEOUT", "ISOLATED", "trusted", "trusted_on", "passed", "lane_allowed"]

def _configs():
    """rule -> [(optimizer name, hyperparameters, steps)]: every optimizer's :class:`~xopt.engines.kernels.Kernel`
    checks (together they reach every branch of its element function), then the first with ``clip_grad_norm``
    (the clip-scale path)."""
    import xopt

    configs = {}
    for name in xopt.__all__:
        cls = getattr(xopt, name)
        kernel = vars(cls).get("kernel") if isinstance(cls, type) else None
        if kernel is not None and lookup(cls) is kernel and not kernel.norms:  # the CUDA source's rules
            configs.setdefault(kernel.rule, []).extend((name, dict(hyper), kernel.steps) for hyper in kernel.checks)
    return {rule: [*found, (found[0][0], {**found[0][1], "clip_grad_norm": 1.0}, found[0][2])]
            for rule, found in sorted(configs.items())}


CONFIGS = _configs()


def configs_for(rule, dtype, state=None):
    """The configurations the self-check of ``rule`` on params of ``dtype`` runs: :data:`CONFIGS`', each with
    ``state_dtype=state`` where a state type is given (Adam's "bfloat16", for params whose math is float)."""
    configs = CONFIGS[rule]
    if state is None:
        return configs
    if state == "8bit":
        from .cuda_blockwise import check_configs

        return check_configs(rule, configs)
    if rule not in fused_cuda.STATE_RULES or state not in fused_cuda.STATE_TYPES:
        raise ValueError(f"rule {rule} has no kernel with {state} state")
    fused_cuda.kernel_name(rule, dtype, state)  # raises where the params' math is not float
    return [(name, {**hyper, "state_dtype": state}, *rest) for name, hyper, *rest in configs]


def _dtype(dtype):
    """``dtype`` (or its name) as a NumPy dtype; "bfloat16" too, where ml_dtypes is not imported yet."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        return np.dtype(_backend.low_precision_dtype(np, dtype))
    return np.dtype(dtype)


def _cases():
    """(shape, param offset, grad offset) in elements: an offset view is not 16-byte aligned."""
    return [((), 0, 0), ((0,), 0, 0), ((3, 5), 0, 0), ((37,), 1, 0), ((37,), 0, 1), ((2 * fused_cuda.CHUNK + 9,), 0, 0)]


RESULTS = {}  # (GPU, rule, dtype name) -> SelfCheck, those impl="auto" ran


class SelfCheckWarning(RuntimeWarning):
    """The CUDA kernel differed from the reference rule on this GPU: the reference rule is used instead."""


@dataclasses.dataclass(frozen=True)
class SelfCheck:
    kernel: str  # the template instance, e.g. "xopt_step<4, float, float>"
    device: int  # the GPU
    passed: bool
    checked: str  # what ran
    mismatch: str | None = None  # the first difference, or why the kernel could not run
    kept: str | None = dataclasses.field(default=None, compare=False)  # the file on disk holding this verdict

    def __str__(self):
        verdict = "passed" if self.passed else f"FAILED: {self.mismatch}"
        return f"self-check of {self.kernel} on GPU {self.device}: {verdict} ({self.checked})"


def rule_of(optimizer) -> int:
    """The kernel rule number of an optimizer (instance, class or name) or of a rule number."""
    if isinstance(optimizer, (int, np.integer)):
        return int(optimizer)
    if isinstance(optimizer, str):
        import xopt

        optimizer = getattr(xopt, optimizer)
    found = lookup(optimizer)
    if found is None or found.norms:  # LAMB's rule is the CPU engine's alone (kernels.NORMS)
        raise ValueError(f"{optimizer!r} has no CUDA kernel")
    return found.rule


def _placed(device, host, offset):
    """``host`` on the device, starting ``offset`` elements into its allocation."""
    flat = np.concatenate([np.zeros(offset, host.dtype), host.reshape(-1)])
    return device.upload(flat)[offset:].reshape(host.shape)


def _first_difference(ours, ref):
    ours, ref = np.asarray(ours).reshape(-1), np.asarray(ref).reshape(-1)
    bits = f"u{ref.dtype.itemsize}"
    differ = (ours.view(bits) != ref.view(bits)) & ~(np.isnan(ours) & np.isnan(ref))
    if not differ.any():
        return None
    i = int(np.argmax(differ))
    return f"element {i}: kernel {ours[i]!r}, reference {ref[i]!r}"


def self_check(optimizer, dtype, device=None) -> SelfCheck:
    """Run the CUDA kernel and the reference rule on the same arrays of GPU ``device`` (default: the
    current one) and compare every param and state element bit for bit; see the module docstring.

    ``optimizer``: an optimizer, its class or name ("Adam"), or a kernel rule number; every
    configuration of :data:`CONFIGS` for its rule is checked.  ``dtype``: the params' dtype, or a case with a
    lower state ("float32/bfloat16": every configuration with ``state_dtype="bfloat16"``).  An error once
    the kernel has run (a CUDA fault is reported by a later call) fails the check; one before raises.
    """
    state = None
    if isinstance(dtype, str) and "/" in dtype:  # a case_name: "float32/bfloat16", bfloat16 state
        dtype, state = dtype.split("/")
    rule, dtype, dev = rule_of(optimizer), _dtype(dtype), fused_cuda.DEVICE
    device = dev.current_device() if device is None else device
    kernel = fused_cuda.kernel_name(rule, dtype, state)
    configs = configs_for(rule, dtype, state)
    cases = _cases()
    steps = sorted({config[2] if len(config) > 2 else 2 for config in configs})
    checked = f"{len(configs)} configurations x {len(cases)} tensors x {'/'.join(map(str, steps))} steps"

    launched = []  # the steps whose kernel ran: a CUDA error after the first is the kernel's (a fault shows late)
    try:
        why = _compare(dev, device, dtype, configs, cases, launched)
    except Exception as exc:  # noqa: BLE001
        if not launched:
            raise  # before any launch: the check cannot run here (no GPU, no memory); no verdict on the kernel
        why = f"{launched[-1]}: after the kernel ran, {exc!r}"
    return SelfCheck(kernel, device, why is None, checked, why)


def _compare(dev, device, dtype, configs, cases, launched):
    """:func:`self_check`'s runs on GPU ``device``: the first difference (or why the kernel could not run), or
    None; appends to ``launched`` each step the kernel ran."""
    import xopt

    with dev.on(device), np.errstate(all="ignore"):
        for name, hyper, *n_steps in configs:
            label = f"{name}({', '.join(f'{k}={v!r}' for k, v in hyper.items())})"
            rng = np.random.default_rng(0)
            hosts = [rng.standard_normal(shape).astype(dtype) for shape, _, _ in cases]
            ref, ours = getattr(xopt, name)(impl="reference", **hyper), getattr(xopt, name)(impl="fused", **hyper)
            a = {f"t{i}": _placed(dev, h, off) for i, (h, (_, off, _)) in enumerate(zip(hosts, cases))}
            b = {f"t{i}": _placed(dev, h, off) for i, (h, (_, off, _)) in enumerate(zip(hosts, cases))}
            for step in range(1, (n_steps[0] if n_steps else 2) + 1):
                gh = [(rng.standard_normal(h.shape) + 0.1).astype(dtype) for h in hosts]
                if "clip_grad_norm" in hyper:  # multiples of 1/64: their sum of squares is exact in any order
                    gh = [(np.round(x.astype(np.float64) * 64) / 64).astype(dtype) for x in gh]
                gh[2].reshape(-1)[0] = -0.0
                if step == 2:
                    gh[2].reshape(-1)[1] = np.nan
                g = {f"t{i}": _placed(dev, x, off) for i, (x, (_, _, off)) in enumerate(zip(gh, cases))}
                ref.update(a, g)
                try:
                    ours.update(b, g)
                except Exception as exc:  # not built, not launched: the kernel cannot be used here
                    return f"{label}: the kernel raised {exc!r}"
                launched.append(f"{label} step {step}")
                for i, (shape, p_off, g_off) in enumerate(cases):
                    k = f"t{i}"
                    where = f"{label} step {step}, tensor {shape} (param offset {p_off}, grad offset {g_off})"
                    diff = _first_difference(dev.download(b[k]), dev.download(a[k]))
                    if diff:
                        return f"{where}, param {diff}"
                    for buf in ref.state[k]:  # the buffers (and an 8-bit one's absmax)
                        if buf == "step":
                            continue
                        diff = _first_difference(dev.download(ours.state[k][buf]), dev.download(ref.state[k][buf]))
                        if diff:
                            return f"{where}, state {buf} {diff}"
    return None


def passed(device, rule, dtype_name) -> bool:
    """Whether the self-check ``impl="auto"`` ran for (GPU ``device``, ``rule``, param dtype) passed; False where
    none ran yet (this runs none: the checked path's :func:`trusted` does)."""
    result = RESULTS.get((device, rule, dtype_name))
    return result is not None and result.passed


def trusted(opt, e) -> bool:
    """May ``impl="auto"`` run the CUDA kernel for entry ``e``?  Asks :func:`verdict` once per (GPU, rule, case)."""
    if fused_cuda.VERIFIED:
        return True
    low = opt._hyper.get("state_dtype")
    low = None if low == "8bit" else low  # the float kernel's entries keep their state in the math type
    return trusted_on(opt, fused_cuda.device_of(e.p), fused_cuda.case_name(e.p.dtype, low))


def trusted_on(opt, device, dtype_name) -> bool:
    """May ``impl="auto"`` run ``opt``'s CUDA kernel for params of ``dtype_name`` on GPU ``device``?  Asks
    :func:`verdict` once per (GPU, rule, dtype) in a process; a failed one warns once."""
    if fused_cuda.VERIFIED:
        return True
    key = (device, rule_of(opt), dtype_name)
    result = RESULTS.get(key)
    if result is None:
        with _LOCK:  # one child per case, whichever thread steps first
            result = RESULTS.get(key)
            if result is None:
                result = RESULTS[key] = verdict(*key)
                if not result.passed:
                    kept = f" (this verdict is kept in {result.kept}: delete it to check again)" if result.kept else ""
                    warnings.warn(f"xopt: {result}. impl='auto' uses the reference rule for {key[2]} params of this "
                                  f"rule on this GPU from now on; please report this with the message.{kept}",
                                  SelfCheckWarning, stacklevel=3)
    return result.passed


# -- the self-check in a child process, its verdict on disk -------------------------------------------------
CHECK = "xopt.engines.cuda_check:self_check"  # what the child runs: check(rule, dtype name, device) -> SelfCheck
TIMEOUT = 600.0  # seconds: a child still running then is stopped, and the kernel fails its check
ISOLATED = True  # False: verdict() runs CHECK here, keeps nothing (the tests' CPU build of the kernel is here)
_FROM_OUTSIDE = {"SIGINT", "SIGTERM", "SIGHUP", "SIGKILL"}  # Ctrl-C, a job's end, the OOM killer: no verdict
_MARK = "xopt-self-check-verdict: "  # the child's line with its verdict (JSON) on stdout
_LOCK = threading.Lock()


def _resolve(spec):
    module, _, qualname = spec.partition(":")
    found = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def _case(device, rule, dtype_name):
    """What a kept verdict is for: the GPU and driver, the kernel (source, options, NVRTC, CuPy), rule, dtype
    and the check; None where the GPU cannot say what it is (then nothing is kept)."""
    try:
        gpu = fused_cuda.DEVICE.identity(device)
        import cupy
        from cupy.cuda import nvrtc

        tools = {"nvrtc": list(nvrtc.getVersion()), "cupy": cupy.__version__}
    except Exception:  # noqa: BLE001  (no runtime, no NVRTC: the child will say what is wrong)
        return None
    source = hashlib.sha256(fused_cuda.SOURCE.read_bytes()).hexdigest()
    host = hashlib.sha256(b"".join(Path(__file__).with_name(name).read_bytes() for name in _HOST_SIDE)).hexdigest()
    return {"gpu": gpu, "source": source, "host": host, "options": list(fused_cuda.OPTIONS), **tools, "rule": rule,
            "dtype": dtype_name, "check": CHECK}


def verdict(device, rule, dtype_name) -> SelfCheck:
    """The self-check's verdict for (GPU ``device``, ``rule``, param dtype): the one kept on disk for this GPU,
    driver and kernel, else :func:`in_child`'s, then kept (except where the child could not run the check).  A GPU
    in an exclusive compute mode, which a child cannot use beside this process, fails the check unrun, not kept."""
    if not ISOLATED:
        return _resolve(CHECK)(rule, dtype_name, device)
    case = _case(device, rule, dtype_name)
    name = f"verdict-{cuda_cache.digest(case)}.json" if case is not None else None
    folder = cuda_cache.directory()
    kept = str(folder / name) if name is not None and folder is not None else None
    found = cuda_cache.read_json(name) if name is not None else None
    if found is not None and found.get("case") == case and isinstance(found.get("passed"), bool):
        return SelfCheck(fused_cuda.kernel_name(rule, dtype_name), device, found["passed"], str(found.get("checked")),
                         found.get("mismatch"), kept)
    try:
        alone = fused_cuda.DEVICE.exclusive(device)
    except Exception:  # noqa: BLE001  (the runtime cannot say: the child will try)
        alone = False
    if alone:
        return SelfCheck(fused_cuda.kernel_name(rule, dtype_name), device, False, "not run",
                         f"GPU {device} is in an exclusive compute mode: the self-check's process cannot use it while "
                         "this one does (not kept; impl='fused' runs the kernel without the check)")
    result, keep = in_child(device, rule, dtype_name)
    if keep and name is not None and cuda_cache.write_json(name, {"case": case, "passed": result.passed,
                                                                  "checked": result.checked,
                                                                  "mismatch": result.mismatch}):
        result = dataclasses.replace(result, kept=kept)
    return result


# The host side a verdict also stands for: the step's table and launch, the scalars' order, this check.  The
# checked path's table (every check's first step, and the lane's where numba cannot run) is cuda_reader's.
_HOST_SIDE = ("cuda_check.py", "cuda_device.py", "cuda_layout.py", "cuda_memory.py", "cuda_reader.py", "fused_cuda.py",
              "kernels.py", "cuda_blockwise.py")
# A CUDA error after the kernel ran that is the kernel's own (kept); any other may pass another time.
_KERNEL_FAULTS = ("IllegalAddress", "MisalignedAddress", "LaunchFailure", "IllegalInstruction", "HardwareStackError",
                  "InvalidPc", "InvalidAddressSpace")


def _kernels_own(result) -> bool:
    """Whether a verdict of :func:`self_check` may be kept: a pass, a mismatch, or a fault of the kernel's."""
    why = result.mismatch or ""
    raised = "after the kernel ran, " in why or ": the kernel raised " in why
    return result.passed or not raised or any(fault in why for fault in _KERNEL_FAULTS)


def in_child(device, rule, dtype_name, check=None, timeout=None):
    """Run ``check`` (default :data:`CHECK`, "module:qualname") for the case in a new Python process:
    (:class:`SelfCheck`, whether the verdict may be kept).  A child killed by a signal before its verdict (a
    kernel's fault can abort it) is a failed check, kept, as is a verdict that is the kernel's own
    (:func:`_kernels_own`, whether or not a signal ended the child after printing it); one still
    running after ``timeout`` (default :data:`TIMEOUT`) s, stopped from outside (SIGINT, SIGTERM, SIGHUP,
    SIGKILL), that exits with an error (it could not run the check: no GPU for it, say), or that cannot be
    started or answers nothing readable is a failed check here, not kept."""
    kernel = fused_cuda.kernel_name(rule, dtype_name)
    check, timeout = check or CHECK, TIMEOUT if timeout is None else timeout
    root = Path(__file__).resolve().parents[2]  # where this xopt is imported from (a checkout: put it first)
    first = None if root.name in ("site-packages", "dist-packages") else str(root)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [first, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-c", "import sys; from xopt.engines import cuda_check; cuda_check._child(sys.argv[1:])",
               str(rule), dtype_name, str(device), check]
    checked = f"in a child process, by {check}"
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return SelfCheck(kernel, device, False, checked, f"the self-check process ran past {timeout:g} s and "
                                                          "was stopped (not kept)"), False
    except OSError as exc:  # no process to be had (no Python at sys.executable, no process slots)
        return SelfCheck(kernel, device, False, checked, f"the self-check process could not start ({exc})"), False
    lines = done.stdout.splitlines()
    found = [line[len(_MARK):] for line in lines if line.startswith(_MARK)]
    # A signal after the verdict was printed came at the process's exit (its interpreter's or the driver's teardown),
    # not in the check, whose every step ends in a download that a fault of the kernel would have failed: the
    # verdict stands.  Before it, the check died: a fault of the kernel's, or a stop from outside.
    if done.returncode < 0 and not found:
        try:
            why = signal.Signals(-done.returncode).name
        except ValueError:
            why = str(-done.returncode)
        if why in _FROM_OUTSIDE:
            return SelfCheck(kernel, device, False, checked, f"the self-check process was stopped by signal {why}"
                                                              " (not kept)"), False
        return SelfCheck(kernel, device, False, checked, f"the self-check process died with signal {why}"), True
    if done.returncode > 0 or not found:
        last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "no message")
        return SelfCheck(kernel, device, False, checked, f"the self-check process could not run the check (exit "
                                                          f"code {done.returncode}: {last.strip()})"), False
    try:
        answer = json.loads(found[-1])
        result = SelfCheck(kernel, device, bool(answer["passed"]), str(answer["checked"]), answer["mismatch"])
    except (ValueError, KeyError, TypeError) as exc:
        return SelfCheck(kernel, device, False, checked, f"the self-check process's answer is unreadable ({exc})"), False
    return result, _kernels_own(result)


def _child(argv):
    """The child's side of :func:`in_child`: ``RULE DTYPE DEVICE CHECK``; prints the verdict as one line."""
    rule, dtype_name, device, check = argv
    result = _resolve(check)(int(rule), dtype_name, int(device))
    print(_MARK + json.dumps({"passed": bool(result.passed), "checked": str(result.checked),
                              "mismatch": None if result.mismatch is None else str(result.mismatch)}), flush=True)


def lane_allowed(opt) -> bool:
    """Whether ``opt``'s impl lets the lane try this engine: ``impl="fused"``, or the kernels verified, or under
    ``impl="auto"`` a self-check of its rule passed on some GPU (:func:`step` checks the step's GPU and dtype)."""
    if opt.impl == "fused" or fused_cuda.VERIFIED:
        return True
    rule = lookup(opt).rule
    return any(result.passed and key[1] == rule for key, result in RESULTS.items())


def _auto_allowed(device, rule, dtype_name) -> bool:
    return passed(device, rule, dtype_name)


def _tell_the_engine():
    """The CUDA engine asks this module (through ``fused_cuda.AUTO_ALLOWED``) whether ``impl="auto"`` may run a
    kernel; the engine does not import this module, which runs it."""
    fused_cuda.AUTO_ALLOWED = _auto_allowed


_tell_the_engine()
