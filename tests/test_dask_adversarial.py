"""Dask params at their edges: the rules that read whole params, chunkings, failures, state after them;
NumPy's numbers (to rounding where the rule sums over a whole param)."""

import numpy as np
import pytest

import xopt

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")


def _steps(name, w0, grads, chunks, grad_chunks=None, **options):
    """The same steps on NumPy and on Dask (synchronous scheduler): (NumPy's params, Dask's, Dask's optimizer)."""
    ref, a = getattr(xopt, name)(**options), {"W": w0.copy()}
    ours, b = getattr(xopt, name)(**options), {"W": da.from_array(w0.copy(), chunks=chunks)}
    graphs = []
    with dask.config.set(scheduler="sync"):
        for g in grads:
            ref.update(a, {"W": g})
            ours.update(b, {"W": da.from_array(g, chunks=grad_chunks or chunks)})
            graphs.append([len(b["W"].__dask_graph__())] + [len(v.__dask_graph__()) for k, v in
                                                             sorted(ours.state["W"].items()) if k != "step"])
    return a, b, ours, graphs


@pytest.mark.parametrize("name", ["LAMB", "Adafactor", "Muon"])
def test_whole_param_rules_keep_a_bounded_graph_and_the_params_chunks(name, rng):
    """Before: LAMB, Adafactor and Muon stepped Dask params by their reference rule into lazy arrays that were never
    persisted: each step added its whole graph to the last (Muon: 650 more tasks a step for a 12x10 param), so
    every later read computed all the steps again; and a grad chunked unlike its param left the new param in the
    chunks of both (ever finer)."""
    w0 = rng.standard_normal((12, 10))
    grads = [rng.standard_normal((12, 10)) for _ in range(5)]
    want, got, opt, graphs = _steps(name, w0, grads, (4, 5), grad_chunks=(6, 3))
    assert graphs == [graphs[0]] * len(grads), graphs
    assert graphs[0][0] == got["W"].npartitions, graphs  # the persisted chunks, nothing more
    assert got["W"].chunks == da.from_array(w0, chunks=(4, 5)).chunks
    with dask.config.set(scheduler="sync"):
        np.testing.assert_allclose(got["W"].compute(), want["W"], rtol=1e-13, atol=1e-15)


def test_adafactor_resumes_on_dask_params_from_a_state_file(rng, tmp_path):
    """Before: a state file's buffers were put back chunked like their param whatever their shape, so Adafactor's
    row and column factors raised "Chunks do not add up to shape" at the first step after ``load(params=...)``
    of Dask params."""
    w0 = rng.standard_normal((12, 10))
    grads = [rng.standard_normal((12, 10)) for _ in range(4)]
    want, _, _, _ = _steps("Adafactor", w0, grads, 4)
    _, params, first, _ = _steps("Adafactor", w0, grads[:2], 4)
    first.save(tmp_path / "s.npz")
    second = xopt.Adafactor()
    second.load(tmp_path / "s.npz", params=params)
    with dask.config.set(scheduler="sync"):
        for g in grads[2:]:
            second.update(params, {"W": da.from_array(g, chunks=4)})
        np.testing.assert_allclose(params["W"].compute(), want["W"], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("unknown", ["param", "grad", "both"])
def test_unknown_chunk_sizes_are_named_as_such(unknown, rng):
    """Before: a Dask array of unknown chunk sizes (boolean indexing) was refused as a shape mismatch, "grad of param
    'W' has shape (nan, 10) but the param has shape (nan, 10) (xopt never broadcasts)", even with equal shapes."""
    w0, g = rng.standard_normal((12, 10)), rng.standard_normal((12, 10))

    def of(x, known):
        x = da.from_array(x, chunks=(4, 5))
        return x if known else x[x[:, 0] > -100]  # every row: the same values, sizes not known until computed

    params = {"W": of(w0, unknown == "grad")}
    opt, before = xopt.Adam(), params["W"]
    culprit = "grad of param 'W'" if unknown == "grad" else "param 'W'"
    with dask.config.set(scheduler="sync"), pytest.raises(ValueError, match=rf"^{culprit} has shape \(nan, 10\).*"
                                                                           r"compute_chunk_sizes"):
        opt.update(params, {"W": of(g, unknown == "param")})
    assert params["W"] is before and opt.state == {} and opt.iter == 0


def test_a_clipped_step_taken_again_with_a_new_client_reads_no_stale_scale(rng, tmp_path):
    """Before: the clip scale persisted by a step was kept by its key (named for the grads) and read by any later
    step whose grads had that key, so after the client changed (a restart, a reconnection) the same step taken
    again from a state file read the old client's cancelled scale: its chunks were cancelled, and the step after
    raised LostStateError, again after every load."""
    distributed = pytest.importorskip("distributed")
    w0 = rng.standard_normal((16, 4))
    grads = [rng.standard_normal((16, 4)) for _ in range(3)]
    ref, want = xopt.Adam(clip_grad_norm=0.5), {"W": w0.copy()}
    for g in grads:
        ref.update(want, {"W": g})
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0",
                                  silence_logs=50) as cluster:
        with distributed.Client(cluster):
            params, opt = {"W": da.from_array(w0.copy(), chunks=4)}, xopt.Adam(clip_grad_norm=0.5)
            opt.update(params, {"W": da.from_array(grads[0], chunks=4)})
            opt.save(tmp_path / "s.npz")
            kept = params["W"].compute()
            opt.update(params, {"W": da.from_array(grads[1], chunks=4)})
            distributed.wait(params["W"])
        with distributed.Client(cluster):  # the first client's futures are cancelled
            params, opt = {"W": da.from_array(kept, chunks=4)}, xopt.Adam()
            opt.load(tmp_path / "s.npz", params=params)
            for g in grads[1:]:
                opt.update(params, {"W": da.from_array(g, chunks=4)})
            got = params["W"].compute()
    np.testing.assert_allclose(got, want["W"], rtol=1e-13, atol=1e-15)


@pytest.fixture(scope="module")
def in_process():
    """A two-worker cluster in this process (its workers cannot be killed; it starts in about a second)."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0",
                                  silence_logs=50) as cluster, distributed.Client(cluster) as client:
        yield client


def test_whole_param_rules_make_durable_points_on_a_cluster(in_process, rng):
    """LAMB's steps on a cluster: the new arrays read a durable point every ``durable-every`` steps, held on two
    workers, and nothing older (before: lazy arrays over every step since the first)."""
    distributed = pytest.importorskip("distributed")
    w0, t = rng.standard_normal((32, 4)), rng.standard_normal((32, 4))
    target = da.from_array(t, chunks=8).persist()
    params, opt = {"W": da.from_array(w0.copy(), chunks=8)}, xopt.LAMB(lr=0.01)
    want, ref = {"W": w0.copy()}, xopt.LAMB(lr=0.01)
    with dask.config.set({"xopt.dask.durable-every": 3}):
        for _ in range(3):
            opt.update(params, {"W": params["W"] - target})
            ref.update(want, {"W": want["W"] - t})
    layers = [dict(a.__dask_graph__().layers) for a in (params["W"], opt.state["W"]["m"], opt.state["W"]["v"])]
    assert all(len(graph) == 1 and next(iter(graph)).startswith("xopt-durable-") for graph in layers), layers
    keys = [f for graph in layers for f in next(iter(graph.values())).values()]
    assert all(len(w) == 2 for w in in_process.who_has(keys).values())
    distributed.wait(params["W"])
    np.testing.assert_allclose(params["W"].compute(), want["W"], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", ["Adam", "Lion", "ScheduleFreeAdamW"])
def test_impl_reference_steps_dask_params(name, rng):
    """Before: with ``impl="reference"`` a step whose params were all Dask arrays raised IndexError (an empty group
    of params for the reference rule was handed to it)."""
    w0 = rng.standard_normal((9, 6))
    grads = [rng.standard_normal((9, 6)) for _ in range(3)]
    want, got, opt, _ = _steps(name, w0, grads, (4, 5), impl="reference")
    assert opt.state["W"]["step"] == 3
    with dask.config.set(scheduler="sync"):
        np.testing.assert_array_equal(got["W"].compute(), want["W"])


def test_a_step_count_set_back_still_gets_durable_points(in_process, rng):
    """Before: the steps since the last durable point were counted from that point's step count, so after
    ``opt.state[key]["step"] = 0`` (a restart of the bias corrections) at count n no durable point came for n steps:
    the scheduler kept every step's tasks, and a lost worker replayed them all."""
    from xopt.engines.dask_lineage import carried

    w0 = rng.standard_normal(32)
    params, opt = {"W": da.from_array(w0, chunks=8)}, xopt.Adam()
    with dask.config.set({"xopt.dask.durable-every": 3}):
        for _ in range(7):
            opt.update(params, {"W": da.ones_like(params["W"])})
        before = carried([params["W"]])
        assert before.step == 6
        opt.state["W"]["step"] = 0
        for _ in range(3):
            opt.update(params, {"W": da.ones_like(params["W"])})
    after = carried([params["W"]])
    assert after is not before and after.step <= 3, (before.step, after.step)


def _steps_in_memory(client, prefix):
    """The task groups named ``prefix...`` that some worker holds results of."""
    return client.run_on_scheduler(lambda dask_scheduler: sorted({
        ts.group_key for ts in dask_scheduler.tasks.values() if ts.state == "memory" and ts.group_key.startswith(prefix)}))


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_the_clip_norm_kept_holds_no_earlier_step_on_the_workers(in_process, rng, skip_nonfinite):
    """Before: ``opt.last_grad_norm`` was the lazy norm over the grads, so with grads computed from p it held the
    previous step's chunks (p and every state buffer) on the workers until the next step: the state twice over
    between steps, three times during one.  It is now the norm the step computed."""
    import time

    distributed = pytest.importorskip("distributed")
    w0, t = rng.standard_normal((32, 4)), rng.standard_normal((32, 4))
    target = da.from_array(t, chunks=8).persist()
    params = {"W": da.from_array(w0.copy(), chunks=8)}
    opt = xopt.RMSprop(clip_grad_norm=0.5, skip_nonfinite=skip_nonfinite)
    want, ref = {"W": w0.copy()}, xopt.RMSprop(clip_grad_norm=0.5)
    for _ in range(4):
        opt.update(params, {"W": params["W"] - target})
        ref.update(want, {"W": want["W"] - t})
        distributed.wait(params["W"])
    deadline = time.monotonic() + 10  # the scheduler forgets released keys asynchronously
    while len(_steps_in_memory(in_process, "xopt-rmsprop")) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_steps_in_memory(in_process, "xopt-rmsprop")) == 1, _steps_in_memory(in_process, "xopt-rmsprop")
    assert float(opt.last_grad_norm.compute()) == pytest.approx(ref.last_grad_norm, rel=1e-14)
    np.testing.assert_allclose(params["W"].compute(), want["W"], rtol=1e-13, atol=1e-15)


def test_schedule_free_eval_and_train_take_a_list_of_dask_params(rng):
    """Before: ``update`` stepped a list of Dask params (rebinding its items), but ``eval`` and ``train`` on that
    list raised TypeError ("pass a dict so they can be replaced")."""
    w0 = rng.standard_normal((8, 4))
    grads = [rng.standard_normal((8, 4)) for _ in range(3)]
    ref, want = xopt.ScheduleFreeAdamW(lr=0.01), [w0.copy()]
    opt, params = xopt.ScheduleFreeAdamW(lr=0.01), [da.from_array(w0.copy(), chunks=4)]
    seen = []
    with dask.config.set(scheduler="sync"):
        for g in grads:
            ref.update(want, [g])
            opt.update(params, [da.from_array(g, chunks=4)])
            ref.eval(want)
            opt.eval(params)
            seen.append((params[0].compute(), want[0].copy()))
            ref.train(want)
            opt.train(params)
        np.testing.assert_array_equal(params[0].compute(), want[0])
    for got, expected in seen:
        np.testing.assert_array_equal(got, expected)


class _Scaled(xopt.SGD):
    """A user's subclass whose rule reads an attribute of its own, set from an argument that is no hyperparameter."""

    def __init__(self, factor=1.0, **options):
        super().__init__(**options)
        self.factor = factor

    def rule(self, xp, p, g, state, s):
        return super().rule(xp, p, self.factor * g, state, s)


def test_a_subclass_reading_attributes_of_its_own_steps_dask_params_as_numpy():
    """Before: each chunk's optimizer was made from the hyperparameters alone, through the subclass's constructor:
    its own attributes took their defaults there (factor 1.0 for 3.0), and the Dask steps differed from NumPy's
    silently."""
    w, g = np.linspace(-1.0, 1.0, 8), np.linspace(0.5, -0.25, 8)
    on_numpy, on_dask = _Scaled(factor=3.0, lr=0.1, momentum=0.5), _Scaled(factor=3.0, lr=0.1, momentum=0.5)
    p_numpy, p_dask = {"w": w.copy()}, {"w": da.from_array(w.copy(), chunks=4)}
    with dask.config.set(scheduler="sync"):
        for _ in range(2):
            on_numpy.update(p_numpy, {"w": g})
            on_dask.update(p_dask, {"w": da.from_array(g, chunks=4)})
        np.testing.assert_array_equal(p_dask["w"].compute(), p_numpy["w"])


def test_skip_nonfinite_checks_every_dask_grad_in_one_computation(rng):
    """Before: the finiteness of each Dask grad was computed on its own, so what the grads share (a backward pass)
    was computed once per grad, and the client waited for the cluster once per grad (20 grads: twice the step's
    time).  Now once for the check, once for the step."""
    runs = []

    def shared_pass(block):  # what every grad reads, counted as it runs
        runs.append(1)
        return -block

    base = rng.standard_normal((3, 8))
    w0 = {f"p{i}": rng.standard_normal(8) for i in range(3)}
    ref, want = xopt.Adam(skip_nonfinite=True), {k: v.copy() for k, v in w0.items()}
    ref.update(want, {k: np.negative(base).sum(axis=0) * (i + 1) for i, k in enumerate(w0)})
    opt, params = xopt.Adam(skip_nonfinite=True), {k: da.from_array(v.copy(), chunks=4) for k, v in w0.items()}
    shared = da.from_array(base, chunks=(1, 8)).map_blocks(shared_pass, meta=np.empty((0, 0)))
    grads = {k: (shared.sum(axis=0) * (i + 1)).rechunk(4) for i, k in enumerate(w0)}
    with dask.config.set(scheduler="sync"):
        opt.update(params, grads)
        assert len(runs) == 2 * shared.npartitions, len(runs)
        for k in w0:
            np.testing.assert_array_equal(params[k].compute(), want[k])


@pytest.mark.parametrize("name", ["LAMB", "Muon"])
def test_whole_param_rules_make_state_chunked_like_the_param(name, rng):
    """Before: LAMB's and Muon's first step made their state in Dask's automatic chunks (``array.chunk-size``), not
    the param's, and the step's arithmetic cut the new param and state at both sets of boundaries: a param of 4
    chunks came back in 11."""
    w0 = rng.standard_normal((100, 10))
    grads = [rng.standard_normal((100, 10)) for _ in range(2)]
    with dask.config.set({"array.chunk-size": "1KiB"}):  # automatic chunks of 12 rows
        want, got, opt, _ = _steps(name, w0, grads, (30, 10))
    assert got["W"].chunks == opt.state["W"]["m"].chunks == ((30, 30, 30, 10), (10,))
    with dask.config.set(scheduler="sync"):
        np.testing.assert_allclose(got["W"].compute(), want["W"], rtol=1e-13, atol=1e-15)


@pytest.mark.slow  # a cluster of worker processes, one of them killed
def test_whole_param_rules_replay_a_lost_worker_from_the_last_durable_point(rng):
    """LAMB's steps on a cluster whose worker is killed between two durable points: the lost chunks are computed
    again from the last point, and the numbers are NumPy's."""
    import os
    import signal

    distributed = pytest.importorskip("distributed")
    w0, t = rng.standard_normal((64, 8)), rng.standard_normal((64, 8))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=50) as cluster, distributed.Client(cluster) as client:
        target = da.from_array(t, chunks=(16, 8)).persist()
        params, opt = {"W": da.from_array(w0.copy(), chunks=(16, 8))}, xopt.LAMB(lr=0.01)
        want, ref = {"W": w0.copy()}, xopt.LAMB(lr=0.01)
        with dask.config.set({"xopt.dask.durable-every": 3}):
            for step in range(8):
                opt.update(params, {"W": params["W"] - target})
                ref.update(want, {"W": want["W"] - t})
                distributed.wait(params["W"])
                if step == 4:
                    os.kill(list(client.run(os.getpid).values())[0], signal.SIGKILL)
        np.testing.assert_allclose(params["W"].compute(), want["W"], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(opt.state["W"]["v"].compute(), ref.state["W"]["v"], rtol=1e-13, atol=1e-15)


def _fails(block, block_info=None):
    if block_info[0]["chunk-location"] == (1, 1):
        raise ZeroDivisionError("in the user's grads")
    return block


@pytest.mark.skipif(not hasattr(BaseException, "add_note"), reason="exception notes: Python 3.11 and later")
@pytest.mark.parametrize("name", ["Adam", "LAMB"])
def test_a_grad_failing_in_one_chunk_is_named_and_changes_nothing(name, rng):
    """Before: the user's exception came out of the step as it was, with nothing saying whose grad it was.  It
    still does (its type and message), with a note naming the param; nothing is written."""
    w0, g = rng.standard_normal((8, 10)), rng.standard_normal((8, 10))
    opt, params = getattr(xopt, name)(), {"W": da.from_array(w0, chunks=(4, 5)), "b": da.from_array(w0[0], chunks=5)}
    grads = {"W": da.from_array(g, chunks=(4, 5)), "b": da.from_array(g[0], chunks=5)}
    with dask.config.set(scheduler="sync"):
        opt.update(params, grads)
        before = (dict(params), {k: dict(v) for k, v in opt.state.items()}, opt.iter)
        with pytest.raises(ZeroDivisionError, match="user's grads") as raised:
            opt.update(params, {**grads, "W": grads["W"].map_blocks(_fails, dtype=float)})
    assert any("'W'" in note and "nothing was changed" in note for note in raised.value.__notes__), raised.value
    assert (params, {k: dict(v) for k, v in opt.state.items()}, opt.iter) == before


def test_a_step_while_another_thread_imports_distributed(monkeypatch, rng):
    """Before: the step read ``distributed.Future`` from ``sys.modules`` whenever the module was there, so a step
    taken while another thread was still importing ``distributed`` (Dask imports it at a persist: several threads'
    first steps) raised AttributeError, "partially initialized module 'distributed' has no attribute 'Future'"."""
    import sys
    import types

    w0, g = rng.standard_normal(8), rng.standard_normal(8)
    want, ref = {"w": w0.copy()}, xopt.Adam(clip_grad_norm=0.5)
    ref.update(want, {"w": g})
    monkeypatch.setitem(sys.modules, "distributed", types.ModuleType("distributed"))  # as it is, half imported
    opt, params = xopt.Adam(clip_grad_norm=0.5), {"w": da.from_array(w0.copy(), chunks=4)}
    with dask.config.set(scheduler="sync"):
        opt.update(params, {"w": da.from_array(g, chunks=4)})
        np.testing.assert_array_equal(params["w"].compute(), want["w"])


def test_state_dict_while_another_thread_imports_the_dask_engine(monkeypatch):
    """Before: ``state_dict()`` called the Dask engine's check whenever its module was in ``sys.modules``, so while
    another thread's first Dask step was importing it, any optimizer's ``state_dict()`` raised AttributeError."""
    import sys
    import types

    opt, params = xopt.Adam(), {"w": np.ones(4)}
    opt.update(params, {"w": np.ones(4)})
    monkeypatch.setitem(sys.modules, "xopt.engines.fused_dask", types.ModuleType("xopt.engines.fused_dask"))
    np.testing.assert_array_equal(opt.state_dict()["state"]["w"]["m"], opt.state["w"]["m"])


@pytest.mark.parametrize("name", ["SGD", "LAMB"])
@pytest.mark.parametrize("masked", ["param", "grad"])
def test_dask_arrays_of_masked_chunks_are_refused_as_masked_arrays_are(name, masked):
    """Before: a Dask array of NumPy masked arrays (``da.ma.masked_array``) was stepped as if unmasked: the masked
    elements were updated (or the masked grads read) and the new param came back without its mask, where a NumPy
    masked array is refused."""
    x, mask = np.arange(8.0), np.arange(8) > 5

    def of(values, is_masked):
        a = da.from_array(values, chunks=4)
        return da.ma.masked_array(a, mask=da.from_array(mask, chunks=4)) if is_masked else a

    params = {"W": of(x.copy(), masked == "param")}
    opt, before = getattr(xopt, name)(), params["W"]
    culprit = "param 'W'" if masked == "param" else "grad of param 'W'"
    with dask.config.set(scheduler="sync"), pytest.raises(TypeError, match=rf"^{culprit} is a Dask array of NumPy "
                                                                          "masked arrays"):
        opt.update(params, {"W": of(np.ones(8), masked == "grad")})
    assert params["W"] is before and opt.state == {} and opt.iter == 0


def test_a_skipped_steps_norm_is_its_number_and_reads_no_grad_again():
    """With clip_grad_norm and skip_nonfinite, a step a NaN skips keeps the norm as its computed number (it kept
    the lazy norm over the grads: reading it ran every grad's tasks again, and held their graph)."""
    calls = []

    def counted(b):
        calls.append(1)
        return b

    rng = np.random.default_rng(0)
    w0, g = rng.standard_normal(40), rng.standard_normal(40)
    g[3] = np.nan
    with dask.config.set(scheduler="sync"):
        opt = xopt.Adam(clip_grad_norm=1.0, skip_nonfinite=True)
        params = {"W": da.from_array(w0.copy(), chunks=10)}
        opt.update(params, {"W": da.from_array(g, chunks=10).map_blocks(counted, dtype=float)})
        assert opt.skipped_steps == 1 and calls
        calls.clear()
        assert np.isnan(float(opt.last_grad_norm.compute()))
    assert not calls and len(opt.last_grad_norm.__dask_graph__().layers) == 1


@pytest.mark.parametrize("name", ["Adam", "LAMB", "Adafactor", "Muon"])
def test_a_param_rechunked_between_steps_keeps_its_new_chunks(name):
    """The whole-tensor rules kept the state's old chunks, and the new param came back with both chunkings met
    (more, smaller chunks every step after)."""
    rng = np.random.default_rng(0)
    w0, g0 = rng.standard_normal((12, 6)), rng.standard_normal((12, 6))
    with dask.config.set(scheduler="sync"):
        opt, ref = getattr(xopt, name)(), getattr(xopt, name)()
        params, twin = {"W": da.from_array(w0.copy(), chunks=(4, 6))}, {"W": w0.copy()}
        for chunks in ((4, 6), (6, 3), (6, 3)):
            params["W"] = params["W"].rechunk(chunks)
            opt.update(params, {"W": da.from_array(g0, chunks=chunks)})
            ref.update(twin, {"W": g0.copy()})
            assert params["W"].chunks == da.empty((12, 6), chunks=chunks).chunks
        np.testing.assert_allclose(params["W"].compute(), twin["W"], rtol=1e-12, atol=1e-14)
