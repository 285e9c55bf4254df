"""Built CUDA kernels and self-check verdicts kept on disk, so that a second process repeats neither.

A kernel instance built by NVRTC (0.2 to 1.3 s each) is kept as one file: its cubin (or PTX, whatever the
build returned) and its lowered (mangled) names, under a key that hashes everything the build depends on: the
kernel source, xopt's NVRTC options, the instances' names, the ``-arch`` option CuPy chooses (for the current
GPU, or the one asked for), NVRTC's version and CuPy's.  A later process with the same key loads the file and
calls NVRTC zero times.  :mod:`xopt.engines.cuda_check` keeps its verdicts here too, as small JSON files.

Every file is written atomically (a temp file in the same folder, renamed onto the name:
:func:`xopt.state_files.atomic_write`), so a reader sees a whole file or none.  A file that does not read
back whole (truncated, corrupt, another format) is ignored: the kernel is built again and the file replaced.

The folder follows the policy of xopt's numba cache (:mod:`xopt._numba`): ``XOPT_CUDA_CACHE_DIR`` where it
is set (empty: no disk cache); else ``__pycache__/xopt-cuda`` beside this file, as numba caches beside
the source; else ``xopt-cuda`` in the user's cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``); else a
folder of this user's in the temporary directory, ``xopt-cuda-cache-<uid>``.  The first that can be written
is used, chosen once per process.  Where none can, kernels are built in memory, once per process, as before:
no error and no warning.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

from ..state_files import atomic_write

__all__ = ["ENV", "directory", "digest", "read", "write", "read_json", "write_json", "kernel_key", "compiled"]

ENV = "XOPT_CUDA_CACHE_DIR"
_MAGIC = b"xopt-kernel-1\n"  # a kernel file: this, the header's length (4 bytes), the JSON header, the binary
_LENGTH = struct.Struct("<I")


# -- the folder ---------------------------------------------------------------------------------------------
def _candidates():
    if ENV in os.environ:
        chosen = os.environ[ENV]
        return [(Path(chosen), False)] if chosen else []
    home_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return [(Path(__file__).with_name("__pycache__") / "xopt-cuda", False),
            (Path(home_cache) / "xopt-cuda", False),
            (Path(tempfile.gettempdir()) / f"xopt-cuda-cache-{uid}", True)]


def _usable(folder: Path, private: bool) -> bool:
    """Whether ``folder`` exists (made if need be) and a file can be created in it; ``private``: a folder in a
    shared place, which must be this user's own."""
    try:
        folder.mkdir(mode=0o700 if private else 0o777, parents=True, exist_ok=True)
        if private and hasattr(os, "getuid") and folder.stat().st_uid != os.getuid():
            return False
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def directory():
    """The cache folder of this process (an absolute :class:`~pathlib.Path`), or None: nothing on disk (see above).
    Absolute: a relative ``XOPT_CUDA_CACHE_DIR`` (or ``XDG_CACHE_HOME``) names the folder it names when first asked,
    not another one after the process changes its working directory (as Hydra's runs do)."""
    for folder, private in _candidates():
        folder = folder.absolute()
        if _usable(folder, private):
            return folder
    return None


# -- files --------------------------------------------------------------------------------------------------
def digest(*parts) -> str:
    """A key: the SHA-256 of ``parts`` as JSON (numbers, strings, lists, dicts)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def read(name: str):
    """The bytes of the cache's file ``name``, or None (no folder, no such file, unreadable)."""
    folder = directory()
    if folder is None:
        return None
    try:
        return (folder / name).read_bytes()
    except OSError:
        return None


def write(name: str, data: bytes) -> bool:
    """Write the cache's file ``name`` atomically; False where it could not be written (nothing else happens)."""
    folder = directory()
    if folder is None:
        return False
    try:
        atomic_write(folder / name, lambda f: f.write(data))
    except OSError:
        return False
    return True


def read_json(name: str):
    """The JSON object in the cache's file ``name``, or None (none there, or not a whole JSON object)."""
    data = read(name)
    try:
        found = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def write_json(name: str, obj: dict) -> bool:
    return write(name, json.dumps(obj, sort_keys=True, indent=1).encode())


# -- kernels ------------------------------------------------------------------------------------------------
def kernel_key(source: str, options, names, arch=None) -> str:
    """The key of a build of ``names`` from ``source`` with ``options``: with the ``-arch`` option CuPy passes
    for ``arch`` (None: the current GPU's), NVRTC's version and CuPy's.  Raises where CuPy cannot say them."""
    import cupy
    from cupy.cuda import compiler, nvrtc

    arch_option, method = compiler._get_arch_for_options_for_nvrtc(arch)  # what compile_using_nvrtc adds
    return digest({"source": hashlib.sha256(source.encode()).hexdigest(), "options": list(options),
                   "names": list(names), "arch": arch_option, "method": method,
                   "nvrtc": list(nvrtc.getVersion()), "cupy": cupy.__version__})


def _encode(binary, lowered) -> bytes:
    text = isinstance(binary, str)
    data = binary.encode() if text else bytes(binary)
    header = json.dumps({"lowered": lowered, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                         "text": text}).encode()
    return _MAGIC + _LENGTH.pack(len(header)) + header + data


def _decode(blob, names):
    """(binary, lowered) from a kernel file's bytes, or None where they are not a whole file of ``names``."""
    if blob is None or not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + _LENGTH.size:
        return None
    start = len(_MAGIC) + _LENGTH.size
    (n,) = _LENGTH.unpack_from(blob, len(_MAGIC))
    try:
        header = json.loads(blob[start:start + n])
        data = blob[start + n:]
        lowered = header["lowered"]
        whole = (len(data) == header["size"] and hashlib.sha256(data).hexdigest() == header["sha256"]
                 and isinstance(lowered, dict) and all(isinstance(lowered.get(name), str) for name in names))
    except (ValueError, KeyError, TypeError):
        return None
    if not whole:
        return None
    return (data.decode() if header.get("text") else data), lowered


def compiled(source: str, options, names, build, arch=None):
    """``build()``'s answer, (binary, {name: lowered name}), for the kernel instances ``names`` built from
    ``source`` with ``options``: read from the cache where a process built them before (NVRTC not called),
    else built and then kept there."""
    if directory() is None:
        return build()
    try:
        name = f"kernel-{kernel_key(source, options, names, arch)}.bin"
    except Exception:  # noqa: BLE001  (CuPy cannot say the arch or NVRTC's version: the build will tell why)
        return build()
    found = _decode(read(name), names)
    if found is not None:
        return found
    binary, lowered = build()
    write(name, _encode(binary, lowered))
    return binary, lowered
