"""xopt's own disk cache of a small CPU step's machine code, loaded with llvmlite: no numba needed to run it.

numba's own cache (``cache=True``) loads a function only after numba is imported and its compiler set up (its
target's registries, which import SciPy to probe for BLAS): some 0.45 s of CPU on a process's first update,
where loading the code itself takes milliseconds (``benchmarks/first_use.py --breakdown``).  So the C
functions a small step runs (:mod:`xopt.engines.cpu_native`: the step, and each rule's element function) are
kept here as object files, compiled by numba the first time a machine needs them and loaded afterwards by
llvmlite's MCJIT alone.  Other steps (large, clipped, on torch tensors, the checked path's) still run numba's
dispatchers, and start numba at their first use.

Each file is ``<name>-<key>.o`` in ``$NUMBA_CACHE_DIR/xopt-objects`` (where that is set), else in
``xopt/engines/__pycache__`` (where writable), else in a folder of the user's under the temporary directory;
``key`` hashes everything the code depends on: the sources of the compiled modules, the numba and llvmlite
installs, the Python version, the host CPU and its features, and the ``NUMBA_*`` settings.  A file holds the
function's symbol, a checksum and the object code; one that does not match is built again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading

__all__ = ["address", "cached", "folder", "beside_numba", "COUNTS"]

# The modules whose code the objects hold (and this one, which loads them), under xopt/.
_SOURCES = ("engines/cpu_structs.py", "engines/cpu_memory.py", "engines/cpu_drivers.py", "engines/cpu_rules.py",
            "engines/cpu_norms.py", "_norms.py", "engines/cpu_native.py", "engines/cpu_objects.py")
_MAGIC = b"xopt-object 1\n"
_LOCK = threading.Lock()
_ADDRESSES = {}  # name -> the address of its function in this process
_STATE = {}  # "key", "folder", "engine" (llvmlite's MCJIT), "objects" (kept alive with it)
# Objects read from the cache and built (compiled by numba) by this process, and functions run from numba's own
# compile (their code needs numba's runtime: LAMB's, which allocate).
COUNTS = {"loaded": 0, "built": 0, "numba": 0}


def _after_fork_in_child():
    global _LOCK
    _LOCK = threading.Lock()  # another thread of the parent may have held it (a build takes seconds)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _llvm():
    import llvmlite.binding as ll

    ll.initialize_native_target()
    ll.initialize_native_asmprinter()
    return ll


def _key() -> str:
    found = _STATE.get("key")
    if found is None:
        ll = _llvm()
        h = hashlib.sha256()
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for name in _SOURCES:
            with open(os.path.join(here, name), "rb") as f:
                h.update(f.read())
        for package in ("numba", "llvmlite"):
            origin = importlib.util.find_spec(package).origin
            st = os.stat(origin)
            h.update(f"{package} {origin} {st.st_mtime_ns} {st.st_size}\n".encode())
        h.update(f"{sys.version}\n{sys.platform}\n{ll.get_host_cpu_name()}\n{ll.get_host_cpu_features().flatten()}\n"
                 .encode())
        h.update(repr(sorted((k, v) for k, v in os.environ.items() if k.startswith("NUMBA_") and k != "NUMBA_CACHE_DIR"))
                 .encode())
        found = _STATE["key"] = h.hexdigest()[:24]
    return found


def folder() -> str:
    """Where the objects are kept (see the module's docstring)."""
    found = _STATE.get("folder")
    if found is None:
        env = os.environ.get("NUMBA_CACHE_DIR")
        if env:
            found = os.path.join(env, "xopt-objects")
        else:
            found = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")
            try:
                os.makedirs(found, exist_ok=True)
                if not os.access(found, os.W_OK):
                    raise OSError
            except OSError:  # a read-only install
                from .._numba import _private_cache_dir

                found = os.path.join(_private_cache_dir(), "xopt-objects")
                _STATE["private"] = True
        _STATE["folder"] = found
    return found


def beside_numba() -> bool:
    """Whether the objects are where numba caches too (``NUMBA_CACHE_DIR``, or the package's own
    ``__pycache__``), not in the private folder of a read-only install, where numba may find no place."""
    folder()
    return not _STATE.get("private", False)


def _path(name) -> str:
    return os.path.join(folder(), f"{name}-{_key()}.o")


def cached(name) -> bool:
    """Whether the object ``name`` is on disk for this machine and these sources (not whether it is sound)."""
    return os.path.exists(_path(name))


def _read(path):
    """(symbol, object code) from the file at ``path``, or None where it is missing or not whole."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if not data.startswith(_MAGIC):
        return None
    lines = data[len(_MAGIC):].split(b"\n", 2)
    if len(lines) != 3 or hashlib.sha256(lines[2]).hexdigest().encode() != lines[1]:
        return None
    return lines[0].decode(), lines[2]


def _write(path, symbol, code):
    """The file, written whole or not at all (another process may be writing the same one)."""
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".o")
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + symbol.encode() + b"\n" + hashlib.sha256(code).hexdigest().encode() + b"\n" + code)
        os.chmod(tmp, 0o644)  # as numba leaves its cache files (mkstemp makes them private)
        os.replace(tmp, path)
    except OSError:  # nowhere to write: the code runs from memory in this process
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _engine():
    found = _STATE.get("engine")
    if found is None:
        ll = _llvm()
        target = ll.Target.from_default_triple().create_target_machine(
            cpu=ll.get_host_cpu_name(), features=ll.get_host_cpu_features().flatten(), reloc="static",
            codemodel="jitdefault")
        module = ll.parse_assembly("")
        module.triple = target.triple
        found = _STATE["engine"] = ll.create_mcjit_compiler(module, target)
        _STATE["objects"] = []
    return found


def _load(symbol, code) -> int:
    ll = _llvm()
    engine = _engine()
    obj = ll.ObjectFileRef.from_data(code)
    engine.add_object_file(obj)
    _STATE["objects"].append(obj)
    engine.finalize_object()
    found = engine.get_function_address(symbol)
    if not found:
        raise RuntimeError(f"xopt internal error: the cached object code has no function {symbol!r}")
    return found


def address(name, build) -> int:
    """The address of the compiled function ``name``: loaded once per process, from the cache where it is
    there, else ``build()`` (numba compiles it: (symbol, object code), see :mod:`xopt.engines.cpu_native`)
    and kept; where ``build()`` gives a numba ``cfunc`` instead (its code needs numba), that, uncached."""
    found = _ADDRESSES.get(name)
    if found is None:
        with _LOCK:
            found = _ADDRESSES.get(name)
            if found is None:
                path = _path(name)
                read = _read(path)
                if read is None:
                    read = build()
                    if not isinstance(read, tuple):
                        COUNTS["numba"] += 1
                        _KEPT.append(read)  # its code lives as long as the cfunc
                        found = _ADDRESSES[name] = read.address
                        return found
                    COUNTS["built"] += 1
                    _write(path, *read)
                else:
                    COUNTS["loaded"] += 1
                found = _ADDRESSES[name] = _load(*read)
    return found


_KEPT = []  # numba cfuncs whose code runs from numba's compile (not cacheable here; numba's cache may hold them)
