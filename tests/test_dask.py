"""Dask arrays on a two-worker local cluster: the seed's loop unchanged, NumPy's numbers, a bounded graph,
one task per chunk per step, a task's thread budget, Dask's schedulers."""

import os
import pathlib
import re
import signal
import threading
import warnings

import numpy as np
import pytest

import xopt
from test_edges import CONFIGS, make

dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")

CHUNKS = (50, 8)
SHAPE = (200, 16)


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                       silence_logs=50)
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


def _inputs(rng, steps):
    w0 = rng.standard_normal(SHAPE)
    grads = [rng.standard_normal(SHAPE) for _ in range(steps)]
    return w0, grads


def _numpy_run(config, w0, grads):
    opt, params = make(config), {"W": w0.copy()}
    for g in grads:
        opt.update(params, {"W": g})
    return params["W"], opt


@pytest.mark.parametrize("config", ["SGD-nesterov-wd", "Momentum", "AdaGrad-all", "RMSprop-all", "Adam",
                                    "AdamW-amsgrad"])
def test_seed_loop_over_dask_arrays_matches_numpy(config, client, rng):
    w0, grads = _inputs(rng, 5)
    want, ref = _numpy_run(config, w0, grads)
    params = {"W": da.from_array(w0.copy(), chunks=CHUNKS)}
    optimizer = make(config)
    for g in grads:  # the seed's loop, unchanged
        optimizer.update(params, {"W": da.from_array(g, chunks=CHUNKS)})
    assert isinstance(params["W"], da.Array) and params["W"].chunks == da.from_array(w0, chunks=CHUNKS).chunks
    np.testing.assert_array_equal(params["W"].compute(), want)
    for name in ref.buffers():
        assert optimizer.state["W"][name].chunks == params["W"].chunks
        np.testing.assert_array_equal(optimizer.state["W"][name].compute(), ref.state["W"][name])


@pytest.mark.parametrize("shape, dtype, chunks", [((), "float32", ()), ((0,), "float64", 2), ((5, 0, 3), "float32", 2),
                                                   ((7,), "float16", 3), ((6, 5), "float16", (4, 2)),
                                                   ((6, 4), "float64", (4, 3))])
def test_edge_shapes_and_float16_params_match_numpy(client, rng, shape, dtype, chunks):
    """float16 params keep float32 state on Dask as on NumPy (Dask's array-API namespace has no float16)."""
    w0 = rng.standard_normal(shape).astype(dtype)
    grads = [rng.standard_normal(shape).astype(dtype) for _ in range(3)]
    want, ref = _numpy_run("AdamW-amsgrad", w0, grads)
    params, optimizer = {"W": da.from_array(w0.copy(), chunks=chunks)}, make("AdamW-amsgrad")
    for g in grads:
        optimizer.update(params, {"W": da.from_array(g, chunks=chunks)})
    got = params["W"].compute()
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    for name in ref.buffers():
        state = optimizer.state["W"][name]
        assert state.dtype == ref.state["W"][name].dtype, name
        np.testing.assert_array_equal(state.compute(), ref.state["W"][name])


def test_graph_stays_bounded_and_data_stays_on_the_workers(client, rng):
    """After every step each array's graph is the step's persisted chunks and one lazy pick per chunk."""
    w0, grads = _inputs(rng, 20)
    params = {"W": da.from_array(w0.copy(), chunks=CHUNKS)}
    optimizer = xopt.Adam()
    n_chunks = params["W"].npartitions
    sizes = []
    for g in grads:
        optimizer.update(params, {"W": da.from_array(g, chunks=CHUNKS)})
        graphs = [params["W"].__dask_graph__(), optimizer.state["W"]["m"].__dask_graph__()]
        sizes.append([(len(graph.layers), len(graph)) for graph in graphs])
        persisted = [set(graph.layers) - {a.name} for graph, a in zip(graphs, (params["W"], optimizer.state["W"]["m"]))]
        assert persisted[0] == persisted[1], "p and m are not picks of the same persisted step"
    assert sizes == [[(2, 2 * n_chunks)] * 2] * 20, sizes
    distributed.wait(params["W"])  # persist returns at once; the chunks land on the workers
    who_has = client.who_has(params["W"])
    assert len(who_has) == n_chunks and all(who_has.values()), "a chunk is not held by any worker"
    np.testing.assert_allclose(params["W"].compute(), _numpy_run("Adam", w0, grads)[0], rtol=0, atol=0)


def test_state_file_round_trip_puts_state_back_chunked_like_the_params(client, rng, tmp_path):
    w0, grads = _inputs(rng, 6)
    straight, _ = _numpy_run("Adam-amsgrad-wd", w0, grads)
    params = {"W": da.from_array(w0.copy(), chunks=CHUNKS)}
    first = make("Adam-amsgrad-wd")
    for g in grads[:3]:
        first.update(params, {"W": da.from_array(g, chunks=CHUNKS)})
    assert isinstance(first.state_dict()["state"]["W"]["m"], da.Array), "state_dict gathered without being asked"
    first.save(tmp_path / "s.npz")
    second = xopt.Adam()
    second.load(tmp_path / "s.npz", params=params)
    for g in grads[3:]:
        second.update(params, {"W": da.from_array(g, chunks=CHUNKS)})
    assert second.state["W"]["m"].chunks == params["W"].chunks
    np.testing.assert_array_equal(params["W"].compute(), straight)


def test_immutable_arrays_in_a_tuple_are_refused(client):
    params = (da.ones(4, chunks=2),)
    with pytest.raises(TypeError, match="tuple"):
        xopt.SGD().update(params, (da.ones(4, chunks=2),))


def test_a_killed_worker_ends_in_an_error_or_the_right_numbers(client, rng):
    """Never silently wrong: after a worker dies mid-run, either the result is NumPy's or something raises."""
    w0, grads = _inputs(rng, 10)
    want, _ = _numpy_run("Adam", w0, grads)
    params = {"W": da.from_array(w0.copy(), chunks=CHUNKS)}
    optimizer = xopt.Adam()
    try:
        for step, g in enumerate(grads):
            optimizer.update(params, {"W": da.from_array(g, chunks=CHUNKS)})
            if step == 4:
                pids = list(client.run(os.getpid).values())
                os.kill(pids[0], signal.SIGKILL)
        got = params["W"].compute()
    except Exception as exc:  # a clear error: the test only asks that it says what happened
        print(f"after the kill: {type(exc).__name__}: {exc}")
        return
    finally:
        client.wait_for_workers(2, timeout=60)
    np.testing.assert_array_equal(got, want)


def _plain_adam(p, g, m, v, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
    """Adam written as plain dask.array expressions, the way a Dask user would (the seed's math)."""
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p - lr * (m / (1 - beta1 ** step)) / (da.sqrt(v / (1 - beta2 ** step)) + eps)
    return p, m, v


def _tasks_run(client, do):
    """The key names of the tasks the cluster ran for ``do()``, all of them finished."""
    with distributed.get_task_stream(client) as stream:
        arrays = do()
        distributed.wait(arrays)
    return [t["key"][0] if isinstance(t["key"], tuple) else t["key"] for t in stream.data]


GRADS = {"persisted": lambda p, target: target,
         "elementwise": lambda p, target: p - target,
         "with-a-reduction": lambda p, target: p - target * p.mean()}


@pytest.mark.parametrize("grads", GRADS)
def test_a_step_runs_one_task_per_chunk_no_more_than_plain_dask_array(client, rng, grads):
    """One xopt task per chunk, where plain dask.array runs one per chunk for each array it writes.  The picks
    of the new p and state are fused into the tasks that read them; only where two kinds of task read p (a
    reduction's and the step's) does its pick run as a task of its own (a reference, not a copy)."""
    w0, (g0,) = _inputs(rng, 1)
    target = da.from_array(g0, chunks=CHUNKS).persist()
    n_chunks = target.npartitions
    grads_of = GRADS[grads]

    params = {"W": da.from_array(w0.copy(), chunks=CHUNKS).persist()}
    optimizer = xopt.Adam()
    optimizer.update(params, {"W": grads_of(params["W"], target)})  # the first step also makes the state
    distributed.wait([target, params["W"], optimizer.state["W"]["m"], optimizer.state["W"]["v"]])
    runs = []
    for _ in range(3):
        def xopt_step():
            optimizer.update(params, {"W": grads_of(params["W"], target)})
            return [params["W"], optimizer.state["W"]["m"], optimizer.state["W"]["v"]]
        runs.append(_tasks_run(client, xopt_step))

    plain = {"p": da.from_array(w0.copy(), chunks=CHUNKS).persist()}
    plain["m"] = da.zeros_like(plain["p"]).persist()
    plain["v"] = da.zeros_like(plain["p"]).persist()
    distributed.wait(list(plain.values()))
    plain_runs = []
    for step in range(1, 4):
        def plain_step():
            g = grads_of(plain["p"], target)
            new = dask.persist(*_plain_adam(plain["p"], g, plain["m"], plain["v"], step))
            plain.update(zip("pmv", new))
            return new
        plain_runs.append(_tasks_run(client, plain_step))
    steps = [sum(bool(re.fullmatch(r"xopt-adam-[0-9a-f]+", k)) for k in run) for run in runs]
    picks = [sorted({k.rsplit("-", 1)[1] for k in run if re.fullmatch(r"xopt-adam-[0-9a-f]+-.+", k)}) for run in runs]
    assert steps == [n_chunks] * 3, runs
    if grads == "with-a-reduction":  # p read by the reduction's tasks and by the step's: its pick is a task
        assert picks == [["p"]] * 3 and [len(run) for run in runs] == [len(runs[0])] * 3, runs
    else:
        assert [len(run) for run in runs] == [n_chunks] * 3, runs
    assert max(map(len, runs)) < min(map(len, plain_runs)), (runs, plain_runs)
    want, reference = w0.copy(), xopt.Adam()
    for _ in range(4):
        reference.update([want], [grads_of(want, g0)])
    np.testing.assert_allclose(params["W"].compute(), want, rtol=1e-13 if grads == "with-a-reduction" else 0)


def _xopt_threads():
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("xopt"))


@pytest.mark.slow  # a cluster of its own
def test_a_chunks_kernel_takes_the_threads_dask_gives_a_task_never_more():
    """xopt would take 4 threads in the worker (XOPT_NUM_THREADS); Dask's OMP_NUM_THREADS=1 wins,
    and a worker given OMP_NUM_THREADS=2 gets two (the pool's one thread beside the task's)."""
    from xopt.engines.fused_cpu import PARALLEL_MIN

    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                                       silence_logs=50, env={"XOPT_NUM_THREADS": "4"})
    try:
        with distributed.Client(cluster) as client:
            assert client.run(os.getenv, "OMP_NUM_THREADS") == {w: "1" for w in client.run(os.getpid)}
            w = da.random.default_rng(0).standard_normal(2 * PARALLEL_MIN, chunks=PARALLEL_MIN)  # big enough
            params = {"W": w.astype(np.float32).persist()}                                     # for threads
            w0 = params["W"].compute()
            optimizer = xopt.Adam()
            threads = []
            for omp in ("1", "2"):
                client.run(lambda: os.environ.update(OMP_NUM_THREADS=omp))  # noqa: B023 (run now)
                optimizer.update(params, {"W": da.ones_like(params["W"])})
                distributed.wait(params["W"])
                threads.append(list(client.run(_xopt_threads).values())[0])
            assert threads == [[], ["xopt_0"]], threads
            np.testing.assert_array_equal(params["W"].compute(),
                                          _numpy_run("Adam", w0, [np.ones_like(w0)] * 2)[0])
    finally:
        cluster.close()


def test_a_pool_first_made_under_a_task_limit_still_serves_the_whole_process():
    from xopt import _threads
    from xopt.engines.fused_cpu import PARALLEL_MIN

    before = xopt.set_num_threads(3)  # a new number: the pool is made again at the next parallel step
    try:
        params, grads = {"W": np.ones(4 * PARALLEL_MIN, np.float32)}, {"W": np.ones(4 * PARALLEL_MIN, np.float32)}
        optimizer = xopt.Adam()
        with _threads.limit(2):
            optimizer.update(params, grads)
        pool = _threads._threads["pool"]  # its threads start as work is submitted: one per thread of a step
        under_limit = pool.size
        optimizer.update(params, grads)
        assert (under_limit, pool.size, _threads._threads["pool"] is pool) == (1, 2, True)
    finally:
        xopt.set_num_threads(before)


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_dask_config_scheduler_is_honoured_beside_a_client(client, rng, scheduler):
    """As ``dask.persist``: ``dask.config.set(scheduler=...)`` wins over the default client; no task reaches it."""
    w0, grads = _inputs(rng, 3)
    params = {"W": da.from_array(w0.copy(), chunks=CHUNKS)}
    optimizer = xopt.Adam()
    with distributed.get_task_stream(client) as stream, dask.config.set(scheduler=scheduler):
        for g in grads:
            optimizer.update(params, {"W": da.from_array(g, chunks=CHUNKS)})
        got = params["W"].compute()
    assert stream.data == []
    np.testing.assert_array_equal(got, _numpy_run("Adam", w0, grads)[0])


def test_no_chunk_anyone_can_read_is_written(client, rng):
    """The user's NumPy array behind ``from_array`` (a view under the threaded scheduler), last step's
    arrays and a ``state_dict()`` snapshot all keep their values after later steps."""
    w0, grads = _inputs(rng, 4)
    kept = w0.copy()
    params = {"W": da.from_array(w0, chunks=CHUNKS)}
    optimizer = xopt.Adam()
    with dask.config.set(scheduler="threads"):
        optimizer.update(params, {"W": da.from_array(grads[0], chunks=CHUNKS)})
        old_p, old_m = params["W"], optimizer.state["W"]["m"]
        snapshot = optimizer.state_dict()["state"]["W"]["v"]
        want_p, want_m, want_v = old_p.compute(), old_m.compute(), snapshot.compute()
        for g in grads[1:]:
            optimizer.update(params, {"W": da.from_array(g, chunks=CHUNKS)})
        np.testing.assert_array_equal(w0, kept)
        np.testing.assert_array_equal(old_p.compute(), want_p)
        np.testing.assert_array_equal(old_m.compute(), want_m)
        np.testing.assert_array_equal(snapshot.compute(), want_v)
        assert not np.array_equal(params["W"].compute(), want_p)


@pytest.mark.slow  # a cluster of its own and 100 steps
def test_the_readme_distributed_example_runs_and_converges(capsys):
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Beyond one machine: Dask"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "LocalCluster(" in code and 'Client("tcp://' in code
    with warnings.catch_warnings():  # another cluster on this machine may hold the dashboard's default port
        warnings.filterwarnings("ignore", message="Port 8787 is already in use", category=UserWarning)
        exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    error = float(capsys.readouterr().out.strip().splitlines()[-1].split(":")[-1])
    assert error < 0.1, error


def test_clipped_steps_with_overrides_on_the_cluster_match_numpy(client, rng):
    """The clip scale is one key on the cluster that every chunk's task reads (persisted with the first
    hyperparameter set's steps, read by the second's); grads of quarters: the norm is exact in any order.
    float16: each chunk's engine scales a grad in float32, as it reads it."""
    w0, b0 = rng.standard_normal(SHAPE).astype(np.float16), rng.standard_normal(SHAPE[1]).astype(np.float16)
    grads = [{"W": (rng.integers(-9, 10, SHAPE) / 4).astype(np.float16),
              "b": (rng.integers(-9, 10, SHAPE[1]) / 4).astype(np.float16)} for _ in range(4)]
    extra = dict(clip_grad_norm=1.0, overrides={"b": {"lr": 0.01}})
    ref, want = xopt.RAdam(**extra), {"W": w0.copy(), "b": b0.copy()}
    ours, params = xopt.RAdam(**extra), {"W": da.from_array(w0.copy(), chunks=CHUNKS), "b": da.from_array(b0, 4)}
    for g in grads:
        ref.update(want, g)
        ours.update(params, {k: da.from_array(v, chunks=params[k].chunks) for k, v in g.items()})
    for k in want:
        np.testing.assert_array_equal(params[k].compute(), want[k])
    assert float(ours.last_grad_norm.compute()) == ref.last_grad_norm > 1.0


_INTERRUPTED_DASK_STEP = """
import signal, sys, threading, time
import dask, dask.array as da, numpy as np, xopt
signal.signal(signal.SIGINT, signal.default_int_handler)
dask.config.set(scheduler="threads")
params = {"W": da.ones(64, chunks=16)}
opt = xopt.Adam()
opt.update(params, {"W": da.ones(64, chunks=16)})
before_W, before_m, before = params["W"], opt.state["W"]["m"], (opt.iter, opt.state["W"]["step"])
slow = da.ones(64, chunks=16).map_blocks(lambda b: (time.sleep(3), b)[1], dtype=float)  # the user's slow grads
threading.Timer(0.5, lambda: __import__("os").kill(__import__("os").getpid(), signal.SIGINT)).start()
t0 = time.monotonic()
try:
    opt.update(params, {"W": slow})
    print("not interrupted")
except KeyboardInterrupt:
    late = time.monotonic() - t0
    same = params["W"] is before_W and opt.state["W"]["m"] is before_m and (opt.iter, opt.state["W"]["step"]) == before
    print("interrupted", round(late, 2), same)
"""


def test_ctrl_c_during_a_dask_step_computation_interrupts_it_and_changes_nothing():
    """A Dask step's computation (the user's lazy grads included) can be interrupted; the optimizer stays at its
    last step: only the rebinding of the new arrays is one call into C."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _INTERRUPTED_DASK_STEP], capture_output=True, text=True, timeout=120)
    words = run.stdout.split()
    assert words[:1] == ["interrupted"], run.stdout + run.stderr
    assert float(words[1]) < 2.5 and words[2] == "True", run.stdout  # before the 3 s grads were done


def test_a_numpy_step_count_at_its_maximum_steps_dask_params_as_the_int_count(rng):
    """The Dask engine took the next step as ``state["step"] + 1`` in the count's own type: np.int8(127) wrapped
    to -128 (Adam's bias correction then failed with 'math domain error').  Its numbers are those of an int
    count, as NumPy params' are."""
    w0, grads = rng.standard_normal(8), [rng.standard_normal(8) for _ in range(2)]
    out = {}
    with dask.config.set(scheduler="sync"):
        for make in (np.int8, int):
            opt, p = xopt.Adam(), {"w": da.from_array(w0.copy(), chunks=4)}
            opt.update(p, {"w": da.from_array(grads[0], chunks=4)})
            opt.state["w"]["step"] = make(127)
            opt.update(p, {"w": da.from_array(grads[1], chunks=4)})
            out[make] = np.asarray(p["w"]), int(opt.state["w"]["step"])
    np.testing.assert_array_equal(out[np.int8][0], out[int][0])
    assert out[np.int8][1] == out[int][1] == 128
