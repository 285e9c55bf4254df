"""torch tensors through the CUDA engine's lane (on the CPU build of its kernel, CPU tensors standing for CUDA ones, as
tests/test_cuda_tensors.py runs them): tensors the lane must leave to the checked path, which refuses them or
steps them by the reference rule."""

from __future__ import annotations

import numpy as np
import pytest

import xopt
from test_cuda_source import HostDevice, at, cuda_on_cpu, tensor_numpy  # noqa: F401  (a fixture)
from test_cuda_tensors import as_cuda  # noqa: F401  (a fixture)

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.cuda_source


def _params(rng):
    return {"a": torch.nn.Parameter(torch.tensor(rng.standard_normal(300), dtype=torch.float32)),
            "b": torch.nn.Parameter(torch.tensor(rng.standard_normal((4, 5)), dtype=torch.float32))}


def _no_null_addresses(monkeypatch):
    """Launches that fail (before the kernel runs) where a tensor with elements has a NULL param, grad or state
    address in the table: the CPU build would read or write address 0 (a crash), a GPU fault."""
    real = HostDevice.launch.__func__

    def launch(cls, function, n_blocks, args):
        n = int(args[3])
        ptrs = at(args[0], np.int64, 5 * n).reshape(5, n)
        sizes = at(args[1], np.int64, n)
        assert not np.any((sizes > 0) & np.any(ptrs[:2] == 0, axis=0)), "a NULL param or grad address launched"
        return real(cls, function, n_blocks, args)
    monkeypatch.setattr(HostDevice, "launch", classmethod(launch))


@pytest.mark.parametrize("where", ["grad", "state buffer"])
def test_a_zero_tensor_is_declined(where, as_cuda, lane, rng, monkeypatch):  # noqa: F811
    """A torch ZeroTensor (``torch._efficientzerotensor``: elements, no memory, ``data_ptr()`` 0) as a grad or as a
    state buffer: the lane declines, launching nothing (the kernel would read address 0 for the grad, and takes a
    NULL buffer for a slot not kept: Adam without its first moment).  The checked path steps the zero grad by the
    reference rule, and steps a copy of the buffer (read-only to it), the whole step."""
    b = _params(rng)
    ours = xopt.Adam()
    ours.update(b, {k: torch.tensor(rng.standard_normal(v.shape), dtype=torch.float32) for k, v in b.items()})
    ref = xopt.Adam(impl="reference")
    a = {k: tensor_numpy(v.detach()).copy() for k, v in b.items()}
    ref.state = {k: {n: (tensor_numpy(v).copy() if isinstance(v, torch.Tensor) else v) for n, v in st.items()}
                 for k, st in ours.state.items()}
    ref.iter = ours.iter
    g = {k: torch.tensor(rng.standard_normal(v.shape), dtype=torch.float32) for k, v in b.items()}
    if where == "grad":
        g["a"] = torch._efficientzerotensor(300)
    else:
        ours.state["b"]["m"] = torch._efficientzerotensor((4, 5))
    _no_null_addresses(monkeypatch)
    launches = HostDevice.launches
    if where == "grad":
        ref.update(a, {k: np.zeros(300, np.float32) if k == "a" else tensor_numpy(v) for k, v in g.items()})
    else:
        ref.state["b"]["m"] = np.zeros((4, 5), np.float32)
        ref.update(a, {k: tensor_numpy(v) for k, v in g.items()})
    ours.update(b, g)
    assert lane[-1] is False and HostDevice.launches == launches
    assert ours.iter == ref.iter and all(ours.state[k]["step"] == ref.state[k]["step"] for k in a)
    for k in a:  # torch's ops on the checked path may round differently in the last place
        np.testing.assert_allclose(tensor_numpy(b[k].detach()), a[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_bfloat16_state_of_tensors_is_the_checked_paths(as_cuda, lane, rng):  # noqa: F811
    """``state_dtype="bfloat16"`` is for NumPy and CuPy arrays: on torch tensors the checked path (and
    impl="reference") refuses it, naming the param.  A state of bfloat16 tensors set by hand does not make the lane
    step it: declined, nothing launched or written, the checked path's error."""
    b = _params(rng)
    plain = xopt.Adam()
    plain.update(b, {k: torch.ones_like(v) for k, v in b.items()})
    ours = xopt.Adam(state_dtype="bfloat16")
    ours.state = {k: {"step": st["step"], "m": st["m"].bfloat16(), "v": st["v"].bfloat16()}
                  for k, st in plain.state.items()}
    ref = xopt.Adam(state_dtype="bfloat16", impl="reference")
    ref.state = {k: {n: (v.clone() if isinstance(v, torch.Tensor) else v) for n, v in st.items()}
                 for k, st in ours.state.items()}
    g = {k: torch.ones_like(v) for k, v in b.items()}
    with pytest.raises(TypeError, match="state_dtype='bfloat16' is supported for NumPy and CuPy arrays only"):
        ref.update(b, g)
    before = {k: v.detach().clone() for k, v in b.items()}
    state = {k: {n: (v.clone() if isinstance(v, torch.Tensor) else v) for n, v in st.items()}
             for k, st in ours.state.items()}
    launches = HostDevice.launches
    with pytest.raises(TypeError, match="state_dtype='bfloat16' is supported for NumPy and CuPy arrays only"):
        ours.update(b, g)
    assert lane[-1] is False and HostDevice.launches == launches and ours.iter == 0
    for k in b:
        torch.testing.assert_close(b[k].detach(), before[k], rtol=0, atol=0)
        assert ours.state[k]["step"] == state[k]["step"]
        for n in ("m", "v"):
            torch.testing.assert_close(ours.state[k][n], state[k][n], rtol=0, atol=0)
