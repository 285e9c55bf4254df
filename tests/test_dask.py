"""Dask arrays on a two-worker local cluster: the seed's loop unchanged, NumPy's numbers, a bounded graph."""

import os
import signal

import numpy as np
import pytest

import xopt
from test_edges import CONFIGS, make

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")

CHUNKS = (50, 8)
SHAPE = (200, 16)


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
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


def test_graph_stays_bounded_and_data_stays_on_the_workers(client, rng):
    w0, grads = _inputs(rng, 20)
    params = {"W": da.from_array(w0.copy(), chunks=CHUNKS)}
    optimizer = xopt.Adam()
    n_chunks = params["W"].npartitions
    sizes = []
    for g in grads:
        optimizer.update(params, {"W": da.from_array(g, chunks=CHUNKS)})
        sizes.append((len(params["W"].__dask_graph__()), len(optimizer.state["W"]["m"].__dask_graph__())))
    assert sizes == [(n_chunks, n_chunks)] * 20, sizes
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
