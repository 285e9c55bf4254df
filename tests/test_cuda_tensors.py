"""torch tensors through the CUDA engine, on the CPU build of its kernel (as tests/test_cuda_source.py runs CuPy's
path): the lane reads each tensor's address and layout through torch's accessors (CPU tensors stand for CUDA ones),
launches once per step on torch's current stream, and bumps the tensors' version counters with the commit; numbers
bit for bit those of the reference rule on the same tensors; whatever the table cannot hold is declined whole."""

from __future__ import annotations

import numpy as np
import pytest

import xopt
from xopt import _lane
from xopt.engines import cuda_check, fused_cuda
from test_cuda_source import HostDevice, cuda_on_cpu, tensor_numpy  # noqa: F401  (a fixture)

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.cuda_source

CONFIGS = [("Adam", {}), ("AdamW", dict(weight_decay=0.1, amsgrad=True)), ("SGD", dict(momentum=0.9, nesterov=True)),
           ("RMSprop", dict(centered=True, momentum=0.5)), ("Lion", dict(weight_decay=0.1)), ("NAdam", {})]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.fixture
def as_cuda(cuda_on_cpu, monkeypatch):  # noqa: F811
    """CPU tensors passed off as CUDA ones: the CPU engine does not take them (``cpu_tensors.dtype_of`` says None,
    as of a CUDA tensor), so the lane asks ``_dispatch.gpu_tensor_kind``, and the CUDA engine (the CPU build of its
    kernel, ``HostDevice``) takes them; impl="auto" runs the self-check first (here, in this process)."""
    monkeypatch.setattr(_lane, "_tensor_dtype", lambda t: None)
    return cuda_on_cpu


def _tensors(rng, dtype, sizes=(5, 300, 2 * fused_cuda.CHUNK + 3, 1)):
    return {f"w{i}": torch.nn.Parameter(torch.tensor(rng.standard_normal(n), dtype=dtype)) for i, n in enumerate(sizes)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_tensors_step_through_the_kernel_bit_for_bit(config, dtype, as_cuda, lane, rng):  # noqa: F811
    """After the first step (the checked path's: torch's ops make the state), every step is the lane's: one launch,
    version counters bumped, and the numbers of the reference rule on NumPy copies of the same params and state
    (the kernel's numbers are NumPy's: torch's own ops may round differently in the last place)."""
    name, hyper = config
    b = _tensors(rng, dtype)
    grads = [{k: torch.tensor(rng.standard_normal(v.shape) + 0.1, dtype=dtype) for k, v in b.items()}
             for _ in range(4)]
    ours = getattr(xopt, name)(**hyper)
    ours.update(b, grads[0])  # the self-check runs first (here, in this process), then the checked path
    assert lane[-1] is False
    ref = getattr(xopt, name)(impl="reference", **hyper)
    a = {k: tensor_numpy(v.detach()).copy() for k, v in b.items()}
    ref.state = {k: {n: (tensor_numpy(v).copy() if isinstance(v, torch.Tensor) else v) for n, v in st.items()}
                 for k, st in ours.state.items()}
    ref.iter = ours.iter
    for g in grads[1:]:
        ref.update(a, {k: tensor_numpy(v) for k, v in g.items()})
        versions = {k: t._version for k, t in b.items()}
        launches = HostDevice.launches
        ours.update(b, g)
        assert lane[-1] is True, "the lane's step"
        assert HostDevice.launches == launches + 1, "one launch a step"
        assert all(b[k]._version > versions[k] for k in b), "version counters bumped, as by torch's writes"
    assert list(cuda_check.RESULTS) == [(0, ours.kernel.rule, str(dtype)[6:])]
    for k in a:
        assert isinstance(b[k], torch.nn.Parameter) and b[k].dtype == dtype
        np.testing.assert_array_equal(tensor_numpy(b[k].detach()), a[k], err_msg=k)
        for buf in ref.buffers():
            assert isinstance(ours.state[k][buf], torch.Tensor)
            np.testing.assert_array_equal(tensor_numpy(ours.state[k][buf]), ref.state[k][buf], err_msg=f"{buf} of {k}")


def test_a_tensor_the_views_refuse_leaves_the_step_to_the_checked_path(as_cuda, lane, rng):  # noqa: F811
    """A grad that is not contiguous, or of another dtype: declined whole, nothing written by the lane; the checked
    path steps it (here, by the reference rule), as it would on a GPU."""
    params = _tensors(rng, torch.float32)
    opt, ref = xopt.Adam(), xopt.Adam(impl="reference")
    twin = {k: torch.nn.Parameter(v.detach().clone()) for k, v in params.items()}
    g = {k: torch.ones_like(v) for k, v in params.items()}
    opt.update(params, g)
    ref.update(twin, g)
    odd = dict(g, w1=torch.ones(600)[::2])
    launches = HostDevice.launches
    opt.update(params, odd)
    ref.update(twin, odd)
    assert lane[-1] is False and HostDevice.launches == launches
    for k in params:
        torch.testing.assert_close(params[k].detach(), twin[k].detach(), rtol=0, atol=0)


def test_xopt_torch_optimizer_steps_through_the_kernel(as_cuda, lane, rng):  # noqa: F811
    """``xopt.torch.Adam(...).step()`` takes the same lane (one launch a step after the first) and follows
    ``torch.optim.Adam`` (float64)."""
    import xopt.torch as xt

    params = list(_tensors(rng, torch.float64).values())
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours, theirs = xt.Adam(params, lr=0.01), torch.optim.Adam(twin, lr=0.01)
    for step in range(4):
        for p, q in zip(params, twin):
            p.grad = torch.tensor(rng.standard_normal(p.shape))
            q.grad = p.grad.clone()
        launches = HostDevice.launches
        ours.step()
        theirs.step()
        if step:  # the first: the self-check's launches (in this process here), then the checked path's step
            assert (lane[-1], HostDevice.launches - launches) == (True, 1)
    for p, q in zip(params, twin):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-15)


def test_cupy_device_takes_cuda_tensors_on_torchs_stream(monkeypatch):
    """``CupyDevice``'s tensor methods, CuPy's and torch's CUDA calls stubbed: a CUDA tensor is taken, a CPU one's
    device is -1 (declined), and a step is queued on torch's current stream of the tensors' GPU."""
    cupy = pytest.importorskip("cupy")
    from xopt.engines.cuda_device import CupyDevice

    seen = []

    class Fake:
        is_cuda = True
        device = torch.device("cuda", 1)

        def detach(self):
            return self

    class TorchStream:
        cuda_stream = 1234

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: seen.append(("stream", device)) or TorchStream())
    monkeypatch.setattr(cupy.cuda, "ExternalStream", lambda ptr, device_id=-1: ("external", ptr, device_id))
    assert CupyDevice.takes_tensor(Fake()) and not CupyDevice.takes_tensor(torch.zeros(1))
    assert CupyDevice.tensor_devices([torch.zeros(1), torch.ones(2)]) == {-1}  # CPU tensors: declined
    assert CupyDevice.tensor_stream(Fake()) == ("external", 1234, 1)
    assert seen[-1] == ("stream", torch.device("cuda", 1))


def _started(rng, dtype=torch.float32, **hyper):
    """Params stepped once (the checked path's step: their state made), a twin on NumPy copies with the same state."""
    b = _tensors(rng, dtype)
    ours = xopt.Adam(**hyper)
    ours.update(b, {k: torch.tensor(rng.standard_normal(v.shape) + 0.1, dtype=dtype) for k, v in b.items()})
    ref = xopt.Adam(impl="reference", **hyper)
    a = {k: tensor_numpy(v.detach()).copy() for k, v in b.items()}
    ref.state = {k: {n: (tensor_numpy(v).copy() if isinstance(v, torch.Tensor) else v) for n, v in st.items()}
                 for k, st in ours.state.items()}
    ref.iter = ours.iter
    return b, ours, a, ref


def test_overrides_and_clipping_take_one_norm_pass_and_one_launch(as_cuda, lane, rng):  # noqa: F811
    """Two hyperparameter sets and clip_grad_norm: the lane's step on tensors is one norm pass and one launch, the
    reference rule's numbers bit for bit, the clip norm the reference's."""
    hyper = dict(clip_grad_norm=0.5, overrides={"w1": {"lr": 0.1, "weight_decay": 0.01}})
    b, ours, a, ref = _started(rng, **hyper)
    for _ in range(3):
        g = {k: torch.tensor(rng.standard_normal(v.shape) * 3, dtype=torch.float32) for k, v in b.items()}
        ref.update(a, {k: tensor_numpy(v) for k, v in g.items()})
        launches, norms = HostDevice.launches, HostDevice.norms
        ours.update(b, g)
        assert lane[-1] is True and HostDevice.launches - launches == 1 and HostDevice.norms - norms == 1
        np.testing.assert_allclose(float(ours.last_grad_norm), float(ref.last_grad_norm), rtol=1e-12)
    for k in a:
        np.testing.assert_array_equal(tensor_numpy(b[k].detach()), a[k], err_msg=k)
        for buf in ref.buffers():
            np.testing.assert_array_equal(tensor_numpy(ours.state[k][buf]), ref.state[k][buf], err_msg=f"{buf} of {k}")


def _bad_grads(b):
    """Grads the lane must decline (each with a reason the table would be wrong), by name."""
    g = {k: torch.ones_like(v) for k, v in b.items()}
    return {
        "another dtype": dict(g, w1=torch.ones(300, dtype=torch.float64)),
        "not contiguous": dict(g, w1=torch.ones(600)[::2]),
        "another shape": dict(g, w1=torch.ones(3, 100)),
        "the param itself": dict(g, w1=b["w1"].detach()),
        "overlapping a state buffer": dict(g, w0=None),  # filled in by the test: a view of w0's exp_avg
        "a negated view": dict(g, w1=torch.ones(300)._neg_view()),
        "a subclass": dict(g, w1=torch.ones(300).as_subclass(type("Sub", (torch.Tensor,), {}))),
        "an inference tensor": dict(g, w1=_inference_ones(300)),
    }


def _inference_ones(n):
    with torch.inference_mode():
        return torch.ones(n)


@pytest.mark.parametrize("case", list(_bad_grads({f"w{i}": torch.zeros(n) for i, n in enumerate((5, 300))})))
def test_tensors_the_table_cannot_hold_are_declined_whole(case, as_cuda, lane, rng):  # noqa: F811
    """A grad of another dtype, shape or layout, one sharing memory with a param or a state buffer, a negated view,
    a subclass, an inference tensor: the lane declines the whole step, launching nothing, and the checked path's numbers are the
    reference's (or it refuses, writing nothing, as it does for the same arrays)."""
    b, ours, a, ref = _started(rng)
    g = _bad_grads(b)[case]
    if case == "overlapping a state buffer":
        g["w0"] = ours.state["w0"]["m"].view(-1)  # the same memory as w0's first moment
    before = {k: v.detach().clone() for k, v in b.items()}
    launches = HostDevice.launches
    try:
        ours.update(b, g)
    except (TypeError, ValueError):
        for k in b:
            torch.testing.assert_close(b[k].detach(), before[k], rtol=0, atol=0)
    else:
        ref.update(a, {k: np.array(tensor_numpy(v.resolve_neg().contiguous().as_subclass(torch.Tensor)))
                       for k, v in g.items()})
        for k in a:  # torch's ops on the checked path may round differently in the last place
            np.testing.assert_allclose(tensor_numpy(b[k].detach()), a[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert lane[-1] is False and HostDevice.launches == launches


def test_tensors_on_two_gpus_are_declined(as_cuda, lane, rng, monkeypatch):  # noqa: F811
    """Params on one GPU and a grad on another: declined, nothing launched (the checked path names the grad)."""
    b, ours, _, _ = _started(rng)
    g = {k: torch.ones_like(v) for k, v in b.items()}
    monkeypatch.setattr(HostDevice, "tensor_devices", staticmethod(lambda ts: {0, 1}))
    launches = HostDevice.launches
    assert _lane.take(ours, b, g) is False and HostDevice.launches == launches


def test_state_buffers_sharing_memory_are_declined(as_cuda, lane, rng):  # noqa: F811
    """A param's two moments made one tensor (as a careless load might): the lane declines, launching nothing; the
    checked path refuses it too, having written nothing."""
    b, ours, _, _ = _started(rng)
    ours.state["w1"]["v"] = ours.state["w1"]["m"]
    before = {k: v.detach().clone() for k, v in b.items()}
    launches = HostDevice.launches
    with pytest.raises(ValueError):
        ours.update(b, {k: torch.ones_like(v) for k, v in b.items()})
    assert lane[-1] is False and HostDevice.launches == launches
    for k in b:
        torch.testing.assert_close(b[k].detach(), before[k], rtol=0, atol=0)


def test_the_clip_norm_of_tensors_is_a_float64_tensor_on_every_step(as_cuda, lane, rng):  # noqa: F811
    """The checked path's first step leaves a 0-d float64 torch tensor in ``last_grad_norm``; the lane's steps after it
    leave one too (over the device's memory), the reference's value."""
    b, ours, a, ref = _started(rng, clip_grad_norm=0.5)
    assert isinstance(ours.last_grad_norm, torch.Tensor)
    for _ in range(2):
        g = {k: torch.tensor(rng.standard_normal(v.shape) * 3, dtype=torch.float32) for k, v in b.items()}
        ref.update(a, {k: tensor_numpy(v) for k, v in g.items()})
        ours.update(b, g)
        assert lane[-1] is True
        norm = ours.last_grad_norm
        assert isinstance(norm, torch.Tensor) and norm.dtype == torch.float64 and norm.shape == ()
        np.testing.assert_allclose(float(norm), float(ref.last_grad_norm), rtol=1e-12)
