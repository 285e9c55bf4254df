"""The C functions of a small CPU step, compiled by numba into object code that runs without numba.

:mod:`xopt.engines.cpu_objects` keeps what :func:`object_code` returns on disk and loads it with llvmlite, so
a process whose cache is warm never starts numba (see there).  Two kinds of function:

- :func:`step_function`: the small step of :mod:`xopt.engines.cpu_step` as ``int64 step(int64 call)``:
  ``call`` the address of an int64 block (``cpu_structs.CALL``) naming the head, the scalars and room for the
  step's addresses and byte ranges.  It checks every array (``cpu_memory.check_rows``) and then, unless the
  step is large, a grad is not finite or an array is refused, runs the rule there.  Where it does not run, it
  writes its answer in the head's ANSWER slot and sets the Python exception ``call[NOT_RUN]`` (the caller,
  ctypes with the GIL held, raises it): nothing written.
- a rule's element function (:func:`xopt.engines.cpu_drivers.elements`; LAMB's two phases,
  :mod:`xopt.engines.cpu_norms`, allocate: they run from numba's compile, cached by numba).

Neither allocates (no numba runtime) nor raises through numba: numba's runtime and exception helpers appear
in their code only on paths that never run (the release of an array that owns memory, a raising call);
:func:`object_code` defines those few symbols as traps inside the object, so it needs nothing of numba; a
function that refers to any other of numba's helpers is not cached (it runs from numba's compile).
"""

from __future__ import annotations

import re

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, types
from numba.core import cgutils
from numba.extending import intrinsic

from .cpu_drivers import all_finite, elements, run_rows
from .cpu_memory import check_rows, typed_pointer
from .kernels import RULES
from .cpu_structs import ANSWER, CALL, CHECK_FINITE, LARGE, NONFINITE, N_HEAD, OFFSETS, WORK_PER_ROW

__all__ = ["step_function", "rule_function", "object_code"]

_N_OFFSETS = len(OFFSETS)


@intrinsic
def _set_exception(typingctx, exc):
    """``PyErr_SetNone(exc)``: the Python exception the caller raises when the call returns."""
    sig = types.void(types.int64)

    def codegen(context, builder, signature, args):
        ptr = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ptr]), "PyErr_SetNone")
        builder.call(fn, [builder.inttoptr(args[0], ptr)])
        return context.get_dummy_value()

    return sig, codegen


def step_function(dtype):
    """The small step over ``dtype`` params (see the module's docstring), a numba ``cfunc``."""

    @cfunc(types.int64(types.int64), error_model="numpy")
    def step(call_at):
        call = carray(typed_pointer(call_at, np.int64), (len(CALL),))
        off = carray(typed_pointer(call[1], np.int64), (_N_OFFSETS,))
        head = carray(typed_pointer(call[2], np.int64), (call[3],))
        scal = carray(typed_pointer(call[4], dtype), (call[5], call[6]))
        n = head[6]
        work = call[7]
        ptrs = carray(typed_pointer(work, np.int64), (n, 5))
        sizes = carray(typed_pointer(work + 40 * n, np.int64), (n,))
        spans = carray(typed_pointer(work + 48 * n, np.int64), (6, 4 * n))
        part = head[N_HEAD + 3 * head[11]:]
        if n < 0 or call[8] < WORK_PER_ROW * n:  # the caller's room: never too small
            answer = 1 + max(n, 0)
        else:
            answer = check_rows(off, head, part, ptrs, sizes, spans)
        if answer == 0:
            total = 0
            for t in range(n):
                total += sizes[t]
            if total >= head[13]:
                answer = LARGE
        if answer == 0 and head[12] & CHECK_FINITE and not all_finite(ptrs, sizes, scal[0]):
            answer = NONFINITE
        if answer != 0:
            head[ANSWER] = answer
            _set_exception(call[9])
            return answer
        run_rows(call[0], ptrs, sizes, scal, part, carray(typed_pointer(0, dtype), (0,)))
        return 0

    return step


def rule_function(rule, dtype, phase=None):
    """Rule number ``rule``'s element function over ``dtype`` params (LAMB's: ``cpu_norms.elements``, or with
    ``phase="norms"`` its norms' phase), a numba ``cfunc``."""
    if rule == RULES["lamb"]:
        from . import cpu_norms

        return (cpu_norms.elements if phase is None else cpu_norms.norms)(dtype)
    return elements(rule, dtype)


# numba's helpers that a step's or a rule's code refers to only on paths that never run there: the release of
# an array that owns memory (these own none), and the wrapper of a C function that raised (none raises).
_TRAPPED = frozenset({"NRT_Free", "NRT_MemInfo_call_dtor", "numba_do_raise", "numba_gil_ensure", "numba_gil_release",
                      "numba_runtime_build_excinfo_struct", "numba_unpickle"})
_DECLARE = re.compile(r'^declare (?P<head>.*?)@(?P<name>"?[\w.$]+"?)\((?P<params>.*)\)(?P<tail>.*)$', re.M)


def object_code(function):
    """(symbol, object code) of a numba ``cfunc`` compiled in this process (not loaded from numba's cache):
    its module with numba's helpers it refers to (:data:`_TRAPPED`) defined as traps, compiled for this
    machine as numba compiles it; or None where it refers to any other of numba's helpers (its code needs
    numba: it runs from numba's own compile, uncached)."""
    import llvmlite.binding as ll

    library = function._library
    text = str(library._final_module)
    needs = [m.group("name").strip('"') for m in _DECLARE.finditer(text)]
    if any(name.startswith(("NRT_", "numba_")) and name not in _TRAPPED for name in needs):
        return None
    if f'@"{function._wrapper_name}"(' not in text and f"@{function._wrapper_name}(" not in text:
        return None  # not compiled here (loaded from numba's cache: its module holds no code)

    def trap(m):
        if m.group("name").strip('"') not in _TRAPPED:
            return m.group(0)
        return (f"define internal {m.group('head')}@{m.group('name')}({m.group('params')}){m.group('tail')} "
                "{\n  call void @llvm.trap()\n  unreachable\n}")

    text = _DECLARE.sub(trap, text)
    if not re.search(r"^declare void @llvm\.trap\(\)", text, re.M):
        text += "\ndeclare void @llvm.trap()\n"
    module = ll.parse_assembly(text)
    module.verify()
    return function._wrapper_name, library._codegen._tm.emit_object(module)
