"""The one place that decides how a step is computed.

``reference``: the optimizer's array-API ``rule``, one param at a time, for any
array library.  Dask arrays always go to :mod:`xopt.engines.fused_dask`, which runs the
chosen path on each chunk where it lives.  ``fused``: an engine that reads and writes each element once —
:mod:`xopt.engines.fused_cpu` (numba) for NumPy arrays, :mod:`xopt.engines.fused_cuda` (CuPy) for
CuPy arrays.  ``auto`` takes a fused engine where one accepts the array and is
trusted under auto (the CUDA one, until verified on a GPU, once its self-check has
passed on that GPU for that rule and dtype), the reference elsewhere.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np

from . import _backend, _numba
from ._inputs import describe
from .engines import blockwise as _eight
from .engines.blockwise import apply_reference as blockwise_reference, is_8bit
from .engines.reference import apply_reference

__all__ = ["IMPLS", "check_impl", "select", "select_whole", "dask_engine", "apply_reference", "hand_over", "lane_engine", "lane_kind",
           "gpu_tensor_kind"]

IMPLS = ("auto", "reference", "fused")


def _fused_cpu():
    """The NumPy engine, or None where numba's code cannot run (see :mod:`xopt._numba`)."""
    if not _numba.usable():
        return None
    from .engines import fused_cpu

    return fused_cpu


_FOUND = {}  # library name -> whether find_spec found it (a lookup costs some 40 us: once per process)


def _installed(name) -> bool:
    """Whether library ``name`` can be imported: imported already, or found once by find_spec.  One
    not found is looked for again only through ``sys.modules``, once something has imported it."""
    if sys.modules.get(name) is not None:
        return True
    found = _FOUND.get(name)
    if found is None:
        found = _FOUND[name] = importlib.util.find_spec(name) is not None
    return found


def _fused_cuda():
    """The CuPy engine, or None when CuPy is not installed."""
    if not _installed("cupy"):
        return None
    engine = _CUDA.get("engine")
    if engine is None:  # an import statement: it waits for another thread's import of the engine to finish
        from .engines import cuda_check, fused_cuda as engine  # noqa: F401  (cuda_check tells the engine what auto may run)
        _CUDA["check"], _CUDA["engine"] = cuda_check, engine
    return engine


def _cuda_check():
    found = _CUDA.get("check")
    if found is None:
        from .engines import cuda_check as found
    return found


_CUDA = {}  # the CUDA engine and its self-check, once both are imported (sys.modules has them while they import)


def _fused_dask():
    """The Dask engine, or None when no Dask array can exist: dask.array not imported (so a NumPy user
    with Dask installed does not import it, half a second, at the first step)."""
    if sys.modules.get("dask.array") is None:
        return None
    from .engines import fused_dask

    fused_dask.SELECT = select  # what each chunk's task runs on its worker (the engine does not import this)
    return fused_dask


def dask_engine():
    """:mod:`xopt.engines.fused_dask`, for a step that has Dask params (dask.array is imported)."""
    return _fused_dask()


def _always(opt, e):
    return True


def _engines(opt):
    """Fused engines for ``opt``, each with whether ``impl="auto"`` may use it for an entry."""
    engines = []
    cpu, cuda = _fused_cpu(), _fused_cuda()
    if cpu is not None and cpu.supports(opt):
        engines.append((cpu, _always))
    if cuda is not None and cuda.supports(opt):
        engines.append((cuda, _cuda_check().trusted))  # its self-check, once per GPU, rule and dtype
    return engines


def _no_kernel(opt):
    from .engines.kernels import kernel_of

    if kernel_of(opt) is None:
        return TypeError(f"impl='fused': {type(opt).__name__} has no fused kernel (a subclass that redefines rule, "
                         "scalars or buffers computes its own rule, which only the reference runs); use "
                         "impl='auto' or impl='reference'")
    return TypeError(f"impl='fused': no installed fused engine runs {opt!r} (bfloat16 state needs the CPU "
                     "engine, numba, or the CUDA engine, CuPy); use impl='auto' or impl='reference'")


def check_impl(impl, opt):
    """``impl``, checked in ``opt``'s constructor: fused needs an engine, and a kernel for ``opt``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    if impl == "fused" and _fused_cpu() is None and _fused_cuda() is None:
        why = _numba.why_not()
        raise ValueError("impl='fused' needs numba (NumPy arrays) or CuPy (GPU arrays)"
                         + (f" ({why}; CuPy is not installed)" if why else "")
                         + "; use impl='auto' to fall back to the reference rule")
    if impl == "fused" and not _engines(opt):
        raise _no_kernel(opt)
    return impl


def _partition(items, test):
    yes, no = [], []
    for item in items:
        (yes if test(item) else no).append(item)
    return yes, no


def select(opt, entries):
    """[(apply function, its entries)] for this step; raises (before any write) if impl can't be honoured.

    Each group's entries share one hyperparameter set (``Entry.opt``, the optimizer itself where
    it is None): an engine takes one set per call.  The reference goes first: it is the path that
    could still fail halfway (an array library out of memory), so a failure there leaves the
    fused groups, which cannot, unwritten.
    """
    by_view = {}
    for e in entries:
        if e.opt is None:
            e.opt = opt
        by_view.setdefault(id(e.opt), []).append(e)
    first, then = [], []
    for group in by_view.values():
        paths = _select(group[0].opt, group)
        first += [p for p in paths if p[0] is apply_reference]
        then += [p for p in paths if p[0] is not apply_reference]
    return first + then


def _select(opt, entries):
    paths = []
    if opt._hyper.get("state_dtype") == "8bit":  # params whose state is 8-bit codes: their own rule
        eight, entries = _partition(entries, lambda e: (type(e.p) is np.ndarray or _backend.library_name(e.p)
                                                        in _eight.LIBRARIES) and is_8bit(opt, e.p.size))
        if eight:
            paths += _blockwise(opt, eight)
        if not entries:
            return paths
    dask_engine = _fused_dask()
    if dask_engine is not None:  # whatever impl: each chunk gets it, on its worker
        chunked, entries = _partition(entries, lambda e: dask_engine.accepts(opt, e))
        if chunked:
            paths.append((dask_engine.apply, chunked))
    if opt.impl == "reference":
        return ([(apply_reference, entries)] if entries else []) + paths  # none left where every param is Dask's
    engines = _engines(opt)
    fused = opt.impl == "fused"
    if fused and entries and not engines:  # opt.impl set since the constructor checked it
        raise _no_kernel(opt)
    groups = {}
    for e in entries:
        engine = next((m for m, under_auto in engines if m.accepts(opt, e) and (fused or under_auto(opt, e))), None)
        if engine is None and opt.impl == "fused" and isinstance(e.p, np.ndarray) and _numba.why_not():
            raise ValueError(f"impl='fused': param {describe(e.key)} is a NumPy array, and the fused CPU engine "
                             f"needs numba ({_numba.why_not()}); use impl='auto' or impl='reference'")
        if engine is None and opt.impl == "fused":
            _refuse_subclass(e)
            raise TypeError(f"impl='fused': no fused kernel takes param {describe(e.key)}, a "
                            f"{_backend.library_name(e.p)} array of {_backend.dtype_name(e.p.dtype)}, for "
                            f"{opt!r}; the CPU kernels take NumPy float16/bfloat16/float32/float64 arrays "
                            "(float16/bfloat16/float32 with state_dtype='bfloat16'), the CUDA kernels CuPy "
                            "float16/bfloat16/float32/float64 arrays (not float64 with state_dtype='bfloat16')")
        groups.setdefault(engine, []).append(e)
    reference = [(apply_reference, groups.pop(None))] if None in groups else []
    return reference + paths + [(engine.apply, group) for engine, group in groups.items()]


def select_whole(opt, entries):
    """For an optimizer whose rule reads whole params (``xopt.optimizers._tensor_rule``): ([(the fused CPU
    engine's apply, its entries of one hyperparameter set)], the entries left to the reference rule, run on
    whole params).  Only the CPU engine has such kernels (``kernels.NORMS``); raises (before any write) where
    ``impl="fused"`` can't be honoured."""
    if opt.impl == "reference":
        return [], entries
    cpu = _fused_cpu()
    if cpu is None or not cpu.supports(opt):
        if opt.impl == "fused" and entries:  # opt.impl set since the constructor checked it
            raise _no_kernel(opt)
        return [], entries
    fused, rest = {}, []
    for e in entries:
        view = e.opt if e.opt is not None else opt
        if cpu.accepts(view, e):
            fused.setdefault(id(view), []).append(e)
        elif opt.impl == "fused":
            _refuse_subclass(e)
            raise TypeError(f"impl='fused': no fused kernel takes param {describe(e.key)}, a "
                            f"{_backend.library_name(e.p)} array of {_backend.dtype_name(e.p.dtype)}, for "
                            f"{opt!r}; its kernel is the CPU engine's alone, which takes NumPy float16/32/64 arrays "
                            "(Adafactor's: CPU torch tensors of those dtypes too)")
        else:
            rest.append(e)
    return [(cpu.apply, group) for group in fused.values()], rest


def _refuse_subclass(e):
    """impl='fused' and a param of a subclass of numpy.ndarray (np.memmap): the TypeError that says so (its dtype
    is one the kernels take: the general message would name that as the reason)."""
    if isinstance(e.p, np.ndarray) and type(e.p) is not np.ndarray:
        raise TypeError(f"impl='fused': param {describe(e.key)} is a {type(e.p).__module__}.{type(e.p).__qualname__}, "
                        "a subclass of numpy.ndarray; the fused kernels take exact NumPy arrays (np.asarray(x) is one "
                        "over x's memory, written in place)")


def _blockwise(opt, entries):
    """The paths of params with 8-bit state: the CUDA kernel for CuPy params where it takes them
    (:mod:`xopt.engines.cuda_blockwise`; under ``impl="auto"`` once its self-check passed on their GPU for that
    rule and dtype), the fused CPU kernel for NumPy params where it has the rule, else the reference."""
    paths = []
    cuda = _cuda_blockwise(opt)
    if cuda is not None:
        taken, entries = _partition(entries, lambda e: cuda.accepts(opt, e))  # under auto: its self-check passed
        if taken:
            paths.append((cuda.apply, taken))
    host, rest = _partition(entries, lambda e: type(e.p) is np.ndarray)
    if host and opt.impl != "reference" and _numba.usable():
        from .engines import cpu_blockwise

        if cpu_blockwise.supports(opt):
            paths.append((cpu_blockwise.apply, host))
            host = []
    rest += host
    if rest and opt.impl == "fused":
        raise TypeError(f"impl='fused': no fused kernel computes the 8-bit state of {opt!r} (param "
                        f"{describe(rest[0].key)}, a {_backend.library_name(rest[0].p)} array){_why_not_8bit(opt, rest[0])}; "
                        "use impl='auto' or impl='reference'")
    if rest:
        paths.append((blockwise_reference, rest))
    return paths


def _cuda_blockwise(opt):
    """The CUDA engine of 8-bit state where it may run ``opt``'s steps (the impl, its rule and block_size), or None."""
    if opt.impl == "reference":
        return None
    if _fused_cuda() is None:
        return None
    from .engines import cuda_blockwise

    return cuda_blockwise if cuda_blockwise.supports(opt) else None


def _why_not_8bit(opt, e):
    if type(e.p) is np.ndarray:
        return "" if _numba.usable() else f" ({_numba.why_not()})"
    if _installed("cupy"):
        from .engines import cuda_blockwise

        return cuda_blockwise.why_not(opt, e)
    return ""


def hand_over(paths, factor):
    """Give each path's entries the clip scale (``Entry.clip``): every engine scales a grad as it reads it."""
    if factor is None:
        return
    for _, group in paths:
        for e in group:
            e.clip = factor


def lane_kind(opt, p):
    """(engine, the engine's ``kind`` of ``opt`` on ``p``'s dtype) for the exact-type lane's step on params like
    ``p``, or None: the checked path takes it.  For NumPy arrays on the CPU engine a fact of the optimizer's class,
    the dtype, the state dtype and the impl, looked up once."""
    if type(p) is np.ndarray:
        key = (type(opt), p.dtype, opt._hyper.get("state_dtype"), opt.impl, _fused_cpu)
        found = _CPU_LANE.get(key, False)
        if found is not False:
            return found
        if opt._hyper.get("state_dtype") == "8bit":  # 8-bit state: its own lane, where the CPU kernel has the rule
            engine = _lane_8bit(opt)
            kind = None if engine is None else engine.kind(opt, p.dtype)
            found = _CPU_LANE[key] = None if kind is None else (engine, kind)
            return found
        engine = lane_engine(opt, np.ndarray)
        kind = None if engine is None else engine.kind(opt, p.dtype)
        found = None if kind is None else (engine, kind)
        if engine is not None and engine is _fused_cpu():  # the CPU engine's answer is for good (the CUDA one
            _CPU_LANE[key] = found  # on a test's host arrays waits for a self-check: asked each time)
        return found
    if opt._hyper.get("state_dtype") == "8bit":  # the checked path sorts 8-bit params from float ones
        return None
    engine = lane_engine(opt, type(p))
    kind = None if engine is None else engine.kind(opt, p.dtype)
    return None if kind is None else (engine, kind)


_CPU_LANE = {}  # (optimizer class, dtype, state dtype, impl, how the CPU engine is found) -> (engine, kind)


def _lane_8bit(opt):
    """:mod:`xopt.engines.cpu_lane8` where the fused CPU kernel of 8-bit state runs ``opt``'s steps (the impl,
    numba, the rule), else None: the checked path takes them."""
    if opt.impl == "reference" or _fused_cpu() is None:
        return None
    from .engines import cpu_blockwise, cpu_lane8

    return cpu_lane8 if cpu_blockwise.supports(opt) else None


def gpu_tensor_kind(opt, t):
    """(the CUDA engine, its ``kind`` of ``opt`` on ``t``'s dtype) for the lane's step on torch tensors like ``t``
    where that engine takes them (CUDA tensors: ``fused_cuda.tensor_dtype``) and the impl lets it: under
    ``impl="auto"`` once the self-check of the rule and dtype has passed on ``t``'s GPU (asked here, once: no
    checked-path step of a tensor asks it); None: the checked path takes them."""
    if opt.impl == "reference" or opt._hyper.get("state_dtype") is not None:
        return None  # 8-bit: torch tensors' is the reference rule; bfloat16 state: NumPy's and CuPy's only (it raises)
    engine = _fused_cuda()
    if engine is None or not engine.supports(opt):
        return None
    dtype = engine.tensor_dtype(t)
    kind = None if dtype is None else engine.kind(opt, dtype)
    if kind is None:
        return None
    if opt.impl != "fused" and not _cuda_check().trusted_on(opt, engine.tensor_device(t), kind.case):
        return None
    return engine, kind


def lane_engine(opt, array_type):
    """The engine whose exact-type lane (:mod:`xopt._lane`) takes ``opt``'s steps on params of
    ``array_type``, or None: the checked path takes them.  NumPy arrays: the CPU engine; otherwise the CUDA
    engine where its device takes that type (``fused_cuda.takes_type``: exact ``cupy.ndarray``) and the impl
    lets it (``impl="auto"``: once a self-check of the rule has passed; the engine checks the step's GPU and
    dtype)."""
    if opt.impl == "reference":
        return None
    if array_type is np.ndarray:
        engine = _fused_cpu()
        if engine is not None:
            return engine  # its kind() answers None where it has no kernel for opt
    engine = _fused_cuda()
    if engine is not None and engine.takes_type(array_type) and engine.supports(opt) and _cuda_check().lane_allowed(opt):
        return engine
    return None
