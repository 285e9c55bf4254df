"""Everything xopt knows about array libraries, in one place.

The optimizer modules never ask which library an array comes from; they get a
namespace ``xp`` from :func:`namespace` and write array-API code.  The few
questions that the standard cannot answer (can this array be written in place,
how do I get it to NumPy and back) are answered here.
"""

from __future__ import annotations

import numpy as np
import array_api_compat as _compat

from . import _numba

__all__ = [
    "namespace",
    "device",
    "is_dask",
    "library_name",
    "is_writable",
    "assign",
    "detached",
    "can_rebind_only",
    "compute_dtype",
    "dtype_name",
    "low_precision_dtype",
    "is_real_floating",
    "to_numpy",
    "from_numpy",
    "byte_spans",
    "numpy_bounds",
    "shares_memory",
]


_numpy_namespace = []  # what array_namespace answers for a NumPy array, once asked


def namespace(*arrays):
    """The array-API namespace of ``arrays`` (raises TypeError if they mix libraries)."""
    if len(arrays) == 1 and type(arrays[0]) is np.ndarray and arrays[0].dtype.names is None:
        # One plain NumPy array (not JAX's float0, a structured dtype), asked once per buffer by state_dict
        # and checks: array_namespace's answer depends on nothing else, and asking it costs microseconds.
        if not _numpy_namespace:
            _numpy_namespace.append(_compat.array_namespace(arrays[0]))
        return _numpy_namespace[0]
    xp = _compat.array_namespace(*arrays)
    if _compat.is_torch_namespace(xp):
        found = _TORCH_NAMESPACES.get(xp)
        if found is None:
            found = _TORCH_NAMESPACES[xp] = _TorchNamespace(xp)
        return found
    return xp


class _TorchNamespace:
    """torch's array-API namespace (array_api_compat's) with a correctly rounded square root on the CPU.

    torch's CPU ``sqrt`` is not correctly rounded (torch 2.13: 1 ulp off on about 1% of float64 roots and 17% of
    float32 ones), NumPy's and the fused kernels' are: a rule run on float32 or float64 CPU tensors takes its roots
    from NumPy, over the tensor's memory, and gives NumPy's numbers bit for bit (a negative's root a NaN, as
    torch's, without NumPy's warning).  Everything else is torch's."""

    def __init__(self, xp):
        import torch

        self._xp, self._roots, self._from_numpy = xp, (torch.float32, torch.float64), torch.from_numpy

    def __getattr__(self, name):
        if name == "_xp":  # not set yet (an instance copy.copy makes): no namespace to ask
            raise AttributeError(name)
        return getattr(self._xp, name)

    def sqrt(self, x):
        if x.dtype in self._roots and x.device.type == "cpu" and not x.requires_grad:
            a = x.resolve_conj().resolve_neg().numpy()
            with np.errstate(invalid="ignore"):
                return self._from_numpy(np.sqrt(a, out=np.empty(a.shape, a.dtype)))
        return self._xp.sqrt(x)


_TORCH_NAMESPACES = {}  # array_api_compat's torch namespace -> its _TorchNamespace


_OWN_DEVICE = ("torch", "cupy", "array_api_strict")  # libraries whose x.device is the array API's device


def device(x):
    if type(x) is np.ndarray:
        return "cpu"
    if library_name(x) in _OWN_DEVICE:
        return x.device
    return _compat.device(x)


def is_dask(x) -> bool:
    return _compat.is_dask_array(x)


def library_name(x) -> str:
    """A short name of the library that made ``x`` ('numpy', 'cupy', 'torch', ...)."""
    return type(x).__module__.split(".")[0]


_IMMUTABLE = {}  # array type -> whether its arrays are immutable (a fact of the type)


def can_rebind_only(x) -> bool:
    """True for immutable array types (JAX, Dask): the container entry is rebound instead."""
    kind = type(x)
    immutable = _IMMUTABLE.get(kind)
    if immutable is None:
        immutable = _IMMUTABLE[kind] = bool(_compat.is_jax_array(x) or _compat.is_dask_array(x))
    return immutable


def is_frozen_inference_tensor(x) -> bool:
    """Whether ``x`` is a torch inference tensor outside ``torch.inference_mode()``: it has no version counter,
    and torch refuses an in-place write to it there (autograd could not see the change)."""
    import torch

    return x.is_inference() and not torch.is_inference_mode_enabled()


def is_writable(x) -> bool:
    """Whether ``x`` can be written in place (a read-only NumPy view cannot)."""
    if type(x) is np.ndarray:
        return x.flags.writeable
    if can_rebind_only(x):
        return False
    if _compat.is_torch_array(x):  # a leaf that requires grad too: assign() writes it under no_grad, as torch.optim does
        return not (is_frozen_inference_tensor(x) or x._is_zerotensor())  # a ZeroTensor has no memory to write
    return _compat.is_writeable_array(x)


def detached(x):
    """x without autograd history (torch), so the rule's arithmetic records none."""
    return x.detach() if _compat.is_torch_array(x) else x


def assign(x, value):
    """x[...] = value, in place."""
    if _compat.is_torch_array(x):
        import torch

        with torch.no_grad():
            x.copy_(value)
        return
    x[...] = value


def is_real_floating(xp, dtype) -> bool:
    """A standard real floating dtype, or bfloat16 (which NumPy's isdtype does not know)."""
    if dtype_name(dtype) == "bfloat16":
        return True
    return xp.isdtype(dtype, "real floating")


def dtype_name(dtype) -> str:
    """'float32' for NumPy's (dtype or scalar type), CuPy's, torch's or array-api-strict's float32."""
    if isinstance(dtype, np.dtype):  # NumPy's and CuPy's: dtype.name is Python code, a few microseconds a call
        name = _NAMES.get(dtype)
        if name is None:
            name = dtype.name
            if len(_NAMES) < 256:
                _NAMES[dtype] = name
        return name
    if isinstance(dtype, type) and issubclass(dtype, np.generic):
        return np.dtype(dtype).name
    inner = getattr(dtype, "dtype", None)  # JAX's scalar types (jnp.float32): their NumPy dtype
    if isinstance(inner, np.dtype):
        return dtype_name(inner)
    return getattr(dtype, "name", None) or str(dtype).rsplit(".", 1)[-1]


_NAMES = {}  # NumPy dtype -> its name (equal dtypes have one name; keys only NumPy's, compared with each other)


def low_precision_dtype(xp, name):
    """The dtype called ``name`` ('bfloat16') in ``xp``, or None where xopt does not support it.

    NumPy gets bfloat16 from ml_dtypes, and CuPy (14) takes the same dtype: its arrays move to NumPy
    (state files) as NumPy's do.  Other libraries are not supported yet: their bfloat16 arrays do not.
    """
    if name == "bfloat16" and (_compat.is_numpy_namespace(xp) or _compat.is_cupy_namespace(xp)):
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return None


def compute_dtype(xp, dtype):
    """The dtype the math and the state are kept in: float16 and bfloat16 are promoted to float32.

    In bfloat16 itself the math would be broken: Adam's beta2=0.999 rounds to 1.0, so v would never
    decay.  As torch's fused optimizers do ("opmath"), a bfloat16 param's math runs in float32 and the
    new param is rounded to bfloat16 (to nearest even) once, at the end of its step."""
    try:
        return _COMPUTE[xp, dtype]
    except KeyError:
        found = _COMPUTE[xp, dtype] = _compute_dtype(xp, dtype)
        return found
    except TypeError:  # an unhashable dtype
        return _compute_dtype(xp, dtype)


_COMPUTE = {}  # (namespace, dtype) -> its compute dtype


def _compute_dtype(xp, dtype):
    """The dtype the math and the state are kept in: float16 and bfloat16 are promoted to float32."""
    if isinstance(dtype, np.dtype) and not dtype.isnative:  # a byte-swapped param: math and state native
        dtype = dtype.newbyteorder("=")
    if isinstance(dtype, np.dtype):  # NumPy's, CuPy's, Dask's, JAX's (bfloat16: ml_dtypes')
        return xp.float32 if dtype == np.float16 or dtype.name == "bfloat16" else dtype
    for name in ("float16", "bfloat16"):  # not in the standard, but in torch
        low = getattr(xp, name, None)
        if low is not None and dtype == low:
            return xp.float32
    return dtype


def to_numpy(x) -> np.ndarray:
    """A NumPy copy of any array (host transfer for device arrays)."""
    if _compat.is_cupy_array(x):
        return x.get()
    if _compat.is_dask_array(x):
        return to_numpy(x.compute())  # gathers to the host: only when asked (save, an explicit copy)
    if _compat.is_torch_array(x):
        return x.detach().cpu().numpy().copy()
    if isinstance(x, np.ndarray):
        return x.copy()
    try:
        return np.from_dlpack(x).copy()
    except (TypeError, AttributeError, BufferError, RuntimeError):
        return np.asarray(x).copy()


def from_numpy(a: np.ndarray, like):
    """``a`` as an array of ``like``'s library, on ``like``'s device."""
    xp = namespace(like)
    if _compat.is_numpy_array(like):
        return np.array(a, copy=True)
    if _compat.is_dask_array(like):
        import dask.array as da

        # chunked like the param where it has its shape; a buffer of another shape (Adafactor's row and column
        # factors) as Dask chunks a new array of that shape
        chunks = like.chunks if tuple(a.shape) == tuple(like.shape) else "auto"
        return da.from_array(np.array(a, copy=True), chunks=chunks)
    return xp.asarray(a, device=device(like), copy=True)


def _strided_span(base, shape, strides, itemsize):
    lo = hi = base
    for n, stride in zip(shape, strides):
        if n == 0:
            return base, base
        if stride > 0:
            hi += (n - 1) * stride
        else:
            lo += (n - 1) * stride
    return lo, hi + itemsize


def numpy_bounds(arrays):
    """(lo, hi) int64 arrays: the byte range each NumPy array can reach (one compiled pass where numba's code
    runs, see :mod:`xopt._numba`)."""
    if _numba.usable():
        from .engines.cpu_memory import byte_bounds
    else:
        from numpy.lib.array_utils import byte_bounds as one

        spans = np.array([one(a) for a in arrays], dtype=np.int64).reshape(-1, 2)
        return spans[:, 0], spans[:, 1]
    return byte_bounds(arrays)


def byte_spans(arrays):
    """(memory space, lo, hi) per array: the bytes it can reach; None where xopt cannot tell (Dask, JAX).

    Two arrays can share memory only if they are in the same space and their [lo, hi) meet.
    """
    spans = [None] * len(arrays)
    numpy_at = [i for i, a in enumerate(arrays) if isinstance(a, np.ndarray)]
    if numpy_at:
        lo, hi = numpy_bounds([arrays[i] for i in numpy_at])
        for i, a, b in zip(numpy_at, lo.tolist(), hi.tolist()):
            spans[i] = ("cpu", a, b)
    for i, a in enumerate(arrays):
        if spans[i] is not None or isinstance(a, np.generic):
            continue
        if _compat.is_cupy_array(a):
            spans[i] = (f"cuda:{a.data.device_id}",
                        *_strided_span(a.data.ptr, a.shape, a.strides, a.itemsize))
        elif library_name(a) == "torch":
            spans[i] = _torch_span(a)
        elif type(a).__module__.startswith("array_api_strict") and isinstance(getattr(a, "_array", None),
                                                                             np.ndarray):
            spans[i] = byte_spans([a._array])[0]
    return spans


_DEVICE_NAMES = {}  # torch device -> its name, the memory space of its tensors


def _torch_span(a):
    """A torch tensor's span; None for a meta tensor (no memory: every one's data_ptr() is 0)."""
    if a.is_meta:
        return None
    device = a.device
    space = _DEVICE_NAMES.get(device)
    if space is None:
        space = _DEVICE_NAMES[device] = str(device)
    size = a.element_size()
    if a.is_contiguous():
        lo = a.data_ptr()
        return space, lo, lo + a.numel() * size if a.numel() else lo
    return (space, *_strided_span(a.data_ptr(), a.shape, [s * size for s in a.stride()], size))


def shares_memory(a, b) -> bool:
    """Whether a and b, whose byte ranges meet, have an element in common (True when it can't be told)."""
    if type(a).__module__.startswith("array_api_strict"):
        a = getattr(a, "_array", a)
    if type(b).__module__.startswith("array_api_strict"):
        b = getattr(b, "_array", b)
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        try:
            return bool(np.shares_memory(a, b, max_work=100_000))
        except np.exceptions.TooHardError:
            return True
    return True
