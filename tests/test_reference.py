"""The reference path (xopt/engines/reference.py): cutting a param into chunks changes no bit, on any layout.

The chunk sizes are shrunk here so that small arrays span many chunks; every chunked
step is held bit for bit to the optimizer's ``rule`` run on the whole arrays.
"""

import tracemalloc

import numpy as np
import pytest

import xopt
from test_edges import CONFIGS, make
from xopt import _backend
from xopt import _checked
from xopt.engines import reference as _reference
from xopt._inputs import Entry

LAYOUTS = ["contiguous", "transposed", "strided", "3-d"]
DTYPES = [np.float16, np.float32, np.float64]


@pytest.fixture
def chunk_bytes(monkeypatch):
    """chunk_bytes(n): chunks of n bytes from here on (any library); the cached kinds are forgotten."""

    def set_to(n):
        monkeypatch.setattr(_reference, "HOST_CHUNK_BYTES", n)
        monkeypatch.setattr(_reference, "TORCH_CPU_CHUNK_BYTES", n)
        monkeypatch.setattr(_reference, "_KINDS", {})

    return set_to


BASES = {"contiguous": (37, 29), "transposed": (29, 37), "strided": (74, 29), "3-d": (5, 14, 11)}


def _view(base, layout):
    """The param: ``base`` itself or a view of it that is not C-contiguous."""
    return {"contiguous": lambda b: b, "transposed": lambda b: b.T, "strided": lambda b: b[1::2, ::-1],
            "3-d": lambda b: b[:, ::2, :]}[layout](base)


def _whole_rule_steps(config, p, grads_seq):
    """The optimizer's rule on the whole NumPy arrays, as the reference path computed it before chunks."""
    opt = make(config)
    compute = np.float32 if p.dtype == np.float16 else p.dtype
    p = p.copy()
    state = {k: np.full(p.shape, opt.initial_value(k), dtype=compute) for k in opt.buffers()}
    for step, g in enumerate(grads_seq, start=1):
        p_new, new = opt.rule(np, p.astype(compute), g.astype(compute), state, opt.scalars(step))
        p = np.asarray(p_new).astype(p.dtype)
        state = {k: np.asarray(v) for k, v in new.items()}
    return p, state


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", CONFIGS)
def test_chunked_steps_equal_the_whole_rule_bit_for_bit(config, dtype, layout, chunk_bytes, rng):
    chunk_bytes(128)  # 16 to 64 elements a chunk: the param spans tens of them
    base = rng.standard_normal(BASES[layout]).astype(dtype)
    p = _view(base, layout)
    assert p.size > 4 * _reference.chunk_elements(np, p)
    kept = base.copy()
    grads_seq = [(rng.standard_normal(p.shape) + 0.1).astype(dtype) for _ in range(3)]
    want_p, want_state = _whole_rule_steps(config, p, grads_seq)
    opt, params = make(config, impl="reference"), {"p": p}
    for g in grads_seq:
        opt.update(params, {"p": g})
    assert params["p"] is p
    np.testing.assert_array_equal(p, want_p)
    assert p.dtype == want_p.dtype
    for k, v in want_state.items():
        assert opt.state["p"][k].dtype == v.dtype
        np.testing.assert_array_equal(opt.state["p"][k], v, err_msg=f"state {k}")
    outside = np.ones(base.shape, dtype=bool)
    _view(outside, layout)[...] = False
    np.testing.assert_array_equal(base[outside], kept[outside], err_msg="elements outside the view changed")


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("config", CONFIGS)
def test_chunked_equals_unchunked_on_every_backend(config, layout, backend, chunk_bytes, rng):
    """The same steps with chunks of 32 bytes and with one chunk per param: equal bit for bit.  13 x 19 float64:
    about 60 chunks contiguous or transposed, about 10 strided (each chunk a step in Python on array_api_strict
    and torch)."""
    p0 = rng.standard_normal((13, 19))
    grads = [rng.standard_normal((13, 19)) + 0.1 for _ in range(3)]

    def run(n):
        chunk_bytes(n)
        base = backend.asarray(p0)
        p = {"contiguous": base, "transposed": base.T, "strided": base[1::2, ::3]}[layout]
        opt, params = make(config, impl="reference"), {"p": p}
        for g in grads:
            gv = backend.asarray(g)
            opt.update(params, {"p": {"contiguous": gv, "transposed": gv.T, "strided": gv[1::2, ::3]}[layout]})
        assert params["p"] is p
        return backend.to_numpy(base), {k: backend.to_numpy(opt.state["p"][k]) for k in opt.buffers()}

    chunked, whole = run(32), run(2**30)
    np.testing.assert_array_equal(chunked[0], whole[0])
    for k in whole[1]:
        np.testing.assert_array_equal(chunked[1][k], whole[1][k], err_msg=f"state {k}")


def test_bfloat16_state_chunked_equals_unchunked(chunk_bytes, rng):
    p0, grads = rng.standard_normal(1000).astype(np.float32), [rng.standard_normal(1000).astype(np.float32)
                                                              for _ in range(3)]

    def run(n):
        chunk_bytes(n)
        opt, params = xopt.Adam(state_dtype="bfloat16", amsgrad=True, impl="reference"), {"p": p0.copy()}
        for g in grads:
            opt.update(params, {"p": g})
        return params["p"], opt.state["p"]

    (p_c, s_c), (p_w, s_w) = run(64), run(2**30)
    np.testing.assert_array_equal(p_c, p_w)
    for k in ("m", "v", "v_max"):
        assert s_c[k].dtype == s_w[k].dtype and _backend.dtype_name(s_c[k].dtype) == "bfloat16"
        np.testing.assert_array_equal(s_c[k].astype(np.float32), s_w[k].astype(np.float32))


def test_torch_leaf_that_requires_grad_is_written_in_chunks_without_history(chunk_bytes, rng):
    torch = pytest.importorskip("torch")
    chunk_bytes(64)
    w0, g = rng.standard_normal((40, 30)), rng.standard_normal((40, 30))
    w = torch.tensor(w0, requires_grad=True)
    opt = xopt.Adam(lr=0.1, impl="reference")
    opt.update({"w": w}, {"w": torch.tensor(g)})
    assert w.requires_grad and w.is_leaf and w.grad_fn is None
    assert not opt.state["w"]["m"].requires_grad
    ref = xopt.Adam(lr=0.1)
    p = {"w": w0.copy()}
    ref.update(p, {"w": g})
    np.testing.assert_allclose(w.detach().numpy(), p["w"], rtol=1e-14)


def test_large_params_keep_their_buffers_and_allocate_chunks_only(rng):
    """An Adam step on 2^20 float64 elements (8 MiB) allocates its new p, m and v and chunks, not a param per
    temporary of the rule, and writes m, v in place."""
    p = {"w": rng.standard_normal(2**20)}
    g = {"w": rng.standard_normal(2**20)}
    opt = xopt.Adam(impl="reference")
    opt.update(p, g)  # makes the state
    m, v = opt.state["w"]["m"], opt.state["w"]["v"]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        opt.update(p, g)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert opt.state["w"]["m"] is m and opt.state["w"]["v"] is v
    # the new p, m and v (written at the end, all at once), then chunks; unchunked: ~5x nbytes more
    assert peak < 3.25 * p["w"].nbytes, f"a step allocated {peak} bytes at its peak"


def test_immutable_params_are_replaced_whole(rng):
    """An entry that must be rebound (JAX) gets a new array; the old one is left as it was."""
    p0, g = rng.standard_normal(3000), rng.standard_normal(3000)
    p = p0.copy()
    p.flags.writeable = False
    opt = xopt.Adam(impl="reference")
    e = Entry("p", p, g, _backend.namespace(p), rebind=True)
    e.state = _checked.state_for(opt, e)
    e.scalars = opt.scalars(1)
    _reference.apply_reference(opt, [e])
    assert e.p is not p
    np.testing.assert_array_equal(p, p0)
    want, _ = _whole_rule_steps("Adam", p0, [g])
    np.testing.assert_array_equal(e.p, want)


@pytest.mark.parametrize("shape, n", [((100,), 7), ((100,), 100), ((6, 10), 7), ((6, 10), 25), ((4, 5, 6), 4),
                                      ((4, 5, 6), 40), ((3, 1, 2, 9), 5), ((2, 3), 1), ((5, 0, 3), 2)])
def test_chunk_indices_cover_each_element_once_in_order_as_views(shape, n):
    a = np.arange(int(np.prod(shape))).reshape(shape)
    seen = []
    for i in _reference.chunk_indices(shape, n):
        chunk = a[i]
        assert chunk.size <= n or i == (...,)
        assert np.shares_memory(chunk, a) or chunk.size == 0
        seen.extend(chunk.reshape(-1).tolist())
    assert seen == list(range(a.size))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_cpu_roots_are_numpys(dtype):
    """The namespace the rules get for CPU torch tensors takes square roots correctly rounded (NumPy's), where
    torch's own CPU sqrt is an ulp off on some; a negative's root is a NaN without a warning."""
    torch = pytest.importorskip("torch")
    import warnings

    x = np.abs(np.random.default_rng(0).standard_normal(20000)).astype(dtype)
    xp = _backend.namespace(torch.from_numpy(x))
    assert xp.sqrt(torch.from_numpy(x)).numpy().tobytes() == np.sqrt(x).tobytes()
    assert float(xp.sqrt(torch.tensor(2.0, dtype=getattr(torch, dtype)))) == float(np.sqrt(np.array(2.0, dtype)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(xp.sqrt(torch.tensor([-1.0], dtype=getattr(torch, dtype))).numpy()).all()
    assert xp.sqrt(torch.ones(2, requires_grad=True)).requires_grad  # torch's own, for autograd


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name, kwargs", [("LAMB", dict(lr=0.01, weight_decay=0.01)), ("Adafactor", dict(lr=0.01)),
                                          ("ScheduleFreeAdamW", dict(lr=0.01)), ("Adam", dict(lr=0.01)),
                                          ("RMSprop", dict(lr=0.01))])
def test_the_rule_on_torch_cpu_tensors_gives_numpys_bits(name, kwargs, dtype):
    """impl="reference" on CPU torch tensors (torch's elementwise ops, NumPy's roots) steps as on NumPy arrays, bit
    for bit, with values spread over many binades (torch's own sqrt missed on about 1% of float64 roots)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    start = {"w": (rng.standard_normal((70, 33)) * np.exp(rng.uniform(-5, 5, (70, 33)))).astype(dtype),
             "b": rng.standard_normal(33).astype(dtype)}
    grads = [{k: (rng.standard_normal(v.shape) * 2).astype(dtype) for k, v in start.items()} for _ in range(5)]
    out = []
    for make in (np.array, torch.tensor):
        opt = getattr(xopt, name)(impl="reference", **kwargs)
        params = {k: make(v.copy()) for k, v in start.items()}
        for g in grads:
            opt.update(params, {k: make(v) for k, v in g.items()})
        out.append(b"".join(np.asarray(v).tobytes() for v in params.values()))
    assert out[0] == out[1]


def test_the_torch_namespace_copies():
    """copy.copy of the namespace the rules get for torch tensors is one too (no recursion through __getattr__)."""
    torch = pytest.importorskip("torch")
    import copy

    xp = _backend.namespace(torch.ones(2))
    made = copy.copy(xp)
    assert made.sqrt(torch.tensor([4.0])).item() == 2.0
