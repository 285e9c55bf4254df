"""Self-checks for the child process of ``xopt.engines.cuda_check.in_child`` (named as ``self_check_cases:NAME``
in ``cuda_check.CHECK``), and a second process that steps with a verdict kept on disk.

Each check has the signature of ``cuda_check.self_check`` (rule, dtype name, device) and stands for what the real
one can do on a GPU: a kernel's fault (the process aborts), a mismatch, a pass, a hang, no GPU for the child.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import numpy as np


def _result(rule, dtype, device, passed, mismatch=None):
    from xopt.engines import cuda_check, fused_cuda

    return cuda_check.SelfCheck(fused_cuda.kernel_name(rule, dtype), device, passed, "a stand-in check", mismatch)


def aborts(rule, dtype, device):
    """What a fault in the kernel does to the process that launched it: SIGABRT, no verdict printed."""
    os.abort()


def mismatches(rule, dtype, device):
    return _result(rule, dtype, device, False, "Adam() step 1, tensor (3, 5), param element 0: kernel 1.0, "
                                               "reference 2.0")


def passes(rule, dtype, device):
    return _result(rule, dtype, device, True)


def terminated(rule, dtype, device):
    """Stopped from outside (a job's end): no verdict on the kernel."""
    import signal

    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)


def hangs(rule, dtype, device):
    time.sleep(120)


def raises(rule, dtype, device):
    raise RuntimeError("no CUDA-capable device is detected")


def second_process(check):
    """Adam under impl="auto" on NumPy arrays routed to the CUDA engine (as the tests' ``cuda_on_cpu`` routes
    them; the CPU build's library is not loaded, so a launch would fail), three steps, beside the reference rule.
    Prints JSON: the children started, the SelfCheckWarnings, whether the params equal the reference's."""
    import xopt
    from xopt import _dispatch
    from xopt.engines import cuda_check, fused_cuda
    from test_cuda_source import HostDevice

    fused_cuda.DEVICE = HostDevice
    fused_cuda.accepts = lambda opt, e: type(e.p) is np.ndarray and type(e.g) is np.ndarray and not e.rebind
    _dispatch._fused_cpu = lambda: None
    _dispatch._fused_cuda = lambda: fused_cuda
    cuda_check.CHECK = check
    children, real = [], cuda_check.in_child
    cuda_check.in_child = lambda *args, **kwargs: (children.append(args), real(*args, **kwargs))[1]
    rng = np.random.default_rng(0)
    a = {"w": rng.standard_normal(40).astype(np.float32)}
    b = {"w": a["w"].copy()}
    ref, ours = xopt.Adam(impl="reference"), xopt.Adam()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            g = {"w": rng.standard_normal(40).astype(np.float32)}
            ref.update(a, g)
            ours.update(b, g)
    print(json.dumps({"children": len(children), "launches": HostDevice.launches,
                      "warnings": [str(w.message) for w in seen if w.category is cuda_check.SelfCheckWarning],
                      "same": bool(np.array_equal(a["w"], b["w"]))}))


if __name__ == "__main__":
    second_process(sys.argv[1])
