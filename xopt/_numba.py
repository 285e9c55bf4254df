"""Whether xopt's numba code can run here: the one place that decides it.

Every caller of numba-compiled code (the CPU engine, the overlap check's byte bounds, the clip norm's sum,
the CUDA engine's host-side gather) asks :func:`usable` and takes its pure NumPy / Python path where it
answers False: numba not installed, numba installed but its import raising (a broken install), numba's JIT
turned off (``NUMBA_DISABLE_JIT=1``: the kernels read memory through intrinsics that cannot run
interpreted), or the compiled code (:mod:`xopt.engines.cpu_drivers`) not importable.  Looked at once per process;
where a small step's code is in xopt's own cache already (:mod:`xopt.engines.cpu_objects`), without importing
numba (its import and start-up are most of a warm process's first update).  Where numba
finds nowhere to cache compiled kernels (a read-only install and no writable home), they are cached in a
folder of the user's under the temporary directory.
"""

from __future__ import annotations

import importlib.util
import os
import sys

__all__ = ["usable", "why_not"]

_USABLE = None  # not looked at yet; then True or False
_WHY = None  # why it is False: the end of impl="fused"'s error


def _look():
    global _USABLE, _WHY
    if "numba" not in sys.modules and _warm():
        _USABLE = True
        return
    try:
        import numba
    except Exception as exc:  # not installed, or a broken install
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == "numba"
        _USABLE, _WHY = False, ("numba is not installed" if missing
                               else f"importing numba failed ({type(exc).__name__}: {exc})")
        return
    if getattr(getattr(numba, "config", None), "DISABLE_JIT", False):
        _USABLE, _WHY = False, "numba's JIT is disabled by NUMBA_DISABLE_JIT"
        return
    try:
        try:
            from .engines import cpu_drivers  # noqa: F401  (the compiled functions, cached on disk)
        except RuntimeError as exc:  # numba found nowhere to cache the kernels: a read-only install, no home
            if "cannot cache" not in str(exc) or numba.config.CACHE_DIR:
                raise
            numba.config.CACHE_DIR = _private_cache_dir()
            from .engines import cpu_drivers  # noqa: F401
    except ImportError as exc:
        _USABLE, _WHY = False, f"importing xopt.engines.cpu_drivers failed ({exc})"
        return
    _USABLE = True


def _warm() -> bool:
    """Whether a small step's compiled code is in xopt's own cache for this machine (and numba is installed, its
    JIT not turned off by ``NUMBA_DISABLE_JIT``): then numba is not imported until something needs it (see
    :mod:`xopt.engines.cpu_objects`).  Not in a read-only install without ``NUMBA_CACHE_DIR``: numba's import
    below finds it a place to cache first."""
    if os.environ.get("NUMBA_DISABLE_JIT", "0").strip() not in ("", "0"):
        return False
    try:
        if importlib.util.find_spec("numba") is None:
            return False
        from .engines import cpu_objects, cpu_step

        return cpu_objects.beside_numba() and cpu_step.cached()
    except Exception:  # a broken install (the import below says why), or no llvmlite
        return False


def _private_cache_dir() -> str:
    """Where numba caches xopt's kernels when it finds no place of its own (the package's folder is read-only
    and there is no writable home): a folder of this user's in the temporary directory.  ``NUMBA_CACHE_DIR``
    chooses another."""
    import tempfile

    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return os.path.join(tempfile.gettempdir(), f"xopt-numba-cache-{uid}")


def usable() -> bool:
    """Whether xopt's numba code can run here."""
    if _USABLE is None:
        _look()
    return _USABLE


def why_not():
    """Why :func:`usable` is False (a phrase), or None where it is not."""
    usable()
    return _WHY
