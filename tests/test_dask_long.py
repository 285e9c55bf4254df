"""Long runs on a Dask cluster: the scheduler's tasks stay bounded, a lost worker costs at most the steps since
the last durable point, the durable copies outlive the Active Memory Manager, and a step (or a save) of state
the cluster lost raises, naming it, and changes nothing."""

import os
import re
import signal
import time

import numpy as np
import pytest

import xopt

dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")

from xopt.engines.dask_lineage import LostStateError  # noqa: E402

N, CHUNK = 8 * 64, 64  # 8 chunks
EVERY = 3


@pytest.fixture(scope="module")
def client():
    # The Active Memory Manager every 0.1 s: a replica it would drop is gone long before a test looks
    with dask.config.set({"distributed.scheduler.active-memory-manager.interval": "100ms"}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                           silence_logs=50)
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.fixture
def every():
    with dask.config.set({"xopt.dask.durable-every": EVERY}):
        yield EVERY


def _tasks(client):
    return client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))


class Run:
    """Adam on a Dask param (grads fused from p and a persisted target) and the same steps on NumPy."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.t = rng.standard_normal(N)
        self.target = da.from_array(self.t, chunks=CHUNK).persist()
        self.params, self.opt = {"W": da.from_array(rng.standard_normal(N), chunks=CHUNK)}, xopt.Adam(lr=0.01)
        self.w, self.ref = self.params["W"].compute(), xopt.Adam(lr=0.01)

    def step(self, n=1):
        for _ in range(n):
            self.opt.update(self.params, {"W": self.params["W"] - self.target})
            self.ref.update({"W": self.w}, {"W": self.w - self.t})
        return self.params["W"]

    def check(self):
        np.testing.assert_array_equal(self.params["W"].compute(), self.w)
        np.testing.assert_array_equal(self.opt.state["W"]["v"].compute(), self.ref.state["W"]["v"])
        assert self.opt.state["W"]["step"] == self.ref.state["W"]["step"]


@pytest.mark.slow
def test_the_schedulers_tasks_stay_bounded_however_many_steps_run(client, every):
    """Without durable points the scheduler keeps every step's tasks, 8 more each step (200 after 24 steps); with
    them, at most the steps since the last one and a few more (forgetting is asynchronous)."""
    run = Run()
    counts = []
    for _ in range(8):
        distributed.wait(run.step(every))
        counts.append(_tasks(client))
    assert max(counts) <= (every + 3) * 8, counts
    run.check()


@pytest.mark.slow
def test_a_lost_worker_replays_only_the_steps_since_the_last_durable_point(client, every):
    run = Run(1)
    distributed.wait(run.step(4 * every + every - 1))  # the worst place: a step short of the next durable point
    with distributed.get_task_stream(client) as stream:
        pid = list(client.run(os.getpid).values())[0]
        os.kill(pid, signal.SIGKILL)
        distributed.wait(run.step())
        run.check()
    steps = [t["key"] for t in stream.data if re.fullmatch(r"xopt-adam-[0-9a-f]+", t["key"][0])]
    # the step itself and the every - 1 before it, on the lost worker's chunks (at most all 8), no more
    assert 8 <= len(steps) <= 8 * every, len(steps)
    client.wait_for_workers(2, timeout=60)


@pytest.mark.slow
def test_durable_copies_outlive_the_active_memory_managers_reduce_replicas(client, every):
    run = Run(2)
    distributed.wait(run.step(every))
    time.sleep(0.5)  # five AMM cycles
    layers = run.params["W"].__dask_graph__().layers
    durable = [layer for name, layer in layers.items() if re.fullmatch("xopt-durable-[0-9a-f]+", name)]
    assert len(durable) == 1, list(layers)
    who_has = client.who_has(list(durable[0].mapping.values()))
    assert len(who_has) == 8 and all(len(w) == 2 for w in who_has.values()), who_has
    distributed.wait(run.step(1))
    time.sleep(0.3)  # the step after: its own keys are single again, the durable point still on two workers
    assert all(len(w) == 2 for w in client.who_has(list(who_has)).values())
    assert client.run_on_scheduler(lambda dask_scheduler: sorted(
        type(p).__name__ for p in dask_scheduler.extensions["amm"].policies)) == ["KeepDurable"]


def _spans(client):
    """The scheduler's spans and the task groups they hold, all of them."""
    return client.run_on_scheduler(lambda dask_scheduler: (
        len(dask_scheduler.extensions["spans"].spans),
        sum(len(s.groups) for s in dask_scheduler.extensions["spans"].spans.values())))


@pytest.mark.slow  # hundreds of steps on a cluster
def test_the_schedulers_spans_do_not_grow_with_the_steps(client, every):
    """The scheduler keeps every span and the task groups it holds for as long as it runs.  Each step is a task
    group of its own, and a step waited for before the next is submitted would open a default span of its own:
    one span and one group more every step.  The steps go in one span (durable points too), and the groups the
    scheduler forgot are dropped from it."""
    run = Run(7)
    distributed.wait(run.step(every))
    before = _spans(client)
    for _ in range(4 * every):
        distributed.wait(run.step())
    after = _spans(client)
    assert after[0] == before[0], (before, after)
    assert after[1] <= before[1] + every, (before, after)
    run.check()


def test_no_durable_points_when_turned_off(client):
    run = Run(3)
    with dask.config.set({"xopt.dask.durable-every": 0}):
        distributed.wait(run.step(12))
    assert not [k for k in run.params["W"].__dask_graph__().layers if k.startswith("xopt-durable")]
    run.check()
    with dask.config.set({"xopt.dask.durable-every": -1}), pytest.raises(ValueError, match="durable-every"):
        run.step()
    assert run.opt.state["W"]["step"] == 12


def _same(run, before):
    assert run.params["W"] is before[0] and run.opt.state["W"]["m"] is before[1]
    assert (run.opt.iter, run.opt.state["W"]["step"]) == before[2]


@pytest.fixture
def own_client():
    """A cluster of its own: restarted, it leaves the other tests' alone."""
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                       silence_logs=50)
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.mark.slow  # a cluster of its own, restarted
def test_a_step_after_a_cluster_restart_raises_naming_the_lost_state_and_changes_nothing(own_client, every,
                                                                                         tmp_path):
    client = own_client
    run = Run(4)
    distributed.wait(run.step(every + 2))
    run.opt.save(tmp_path / "s.npz")
    saved_at = (run.w.copy(), run.ref.state_dict())
    distributed.wait(run.step(2))
    client.restart(wait_for_workers=False)
    client.wait_for_workers(1, timeout=120)
    run.target = da.from_array(run.t, chunks=CHUNK).persist()  # the user's own data, made again
    before = (run.params["W"], run.opt.state["W"]["m"], (run.opt.iter, run.opt.state["W"]["step"]))
    for _ in range(2):  # and again: nothing moved
        with pytest.raises(LostStateError, match=rf"param 'W', at step count {every + 4}, can no longer be "
                                                 r"computed: its key .* is cancelled.*save\(\)"):
            run.opt.update(run.params, {"W": run.params["W"] - run.target})
        _same(run, before)
    with pytest.raises(LostStateError, match=rf"state 'm' of param 'W', at step count {every + 4}.*save\(\)"):
        run.opt.state_dict()
    with pytest.raises(LostStateError, match="state 'm'"):
        run.opt.save(tmp_path / "t.npz")
    assert not (tmp_path / "t.npz").exists()
    _same(run, before)
    # the way back: the last file
    run.w, run.ref = saved_at[0], xopt.Adam()
    run.ref.load_state_dict(saved_at[1])
    run.params["W"] = da.from_array(run.w, chunks=CHUNK)
    run.opt.load(tmp_path / "s.npz", params=run.params)
    run.step(every + 1)
    run.check()


def test_a_step_after_one_that_failed_on_the_cluster_raises_its_error(client):
    run = Run(5)
    with dask.config.set({"xopt.dask.durable-every": 0}):
        run.step(2)

        def boom(x):
            raise ZeroDivisionError("in the user's grads")

        run.opt.update(run.params, {"W": run.params["W"].map_blocks(boom, dtype=float)})  # lazy: it counts
        distributed.wait(run.params["W"])
        before = (run.params["W"], run.opt.state["W"]["m"], (run.opt.iter, run.opt.state["W"]["step"]))
        with pytest.raises(LostStateError, match=r"at step count 3.*failed on the cluster: ZeroDivisionError"):
            run.step()
        _same(run, before)


def test_a_durable_point_waits_for_its_step_and_raises_its_error_with_nothing_changed(client, every):
    """At a durable point the step is computed before update returns: a failure there is the step's own."""
    run = Run(6)
    run.step(every - 1)
    before = (run.params["W"], run.opt.state["W"]["m"], (run.opt.iter, run.opt.state["W"]["step"]))

    def boom(x):
        raise ZeroDivisionError("in the user's grads")

    with pytest.raises(ZeroDivisionError, match="user's grads"):
        run.opt.update(run.params, {"W": run.params["W"].map_blocks(boom, dtype=float)})
    _same(run, before)
    run.step(every + 1)
    run.check()


def test_the_key_split_memo_is_cleared_past_its_bound():
    """Dask's ``key_split`` memo keeps 100,000 keys; a step adds about ten, so the scheduler's plugin clears it
    past ``KEY_SPLIT_KEPT``: bounded memory, the same answers."""
    from dask.utils import key_split

    from xopt.engines import dask_amm

    key_split.cache_clear()
    names = [f"xopt-adam-{i:032x}" for i in range(300)]
    assert [key_split((n, 0)) for n in names] == ["xopt-adam"] * 300
    assert key_split.cache_info().currsize == 600  # each tuple and its name
    assert not dask_amm.trim_key_split(kept=600)
    assert dask_amm.trim_key_split(kept=599)
    assert key_split.cache_info().currsize == 0
    assert key_split((names[0], 1)) == "xopt-adam"


@pytest.mark.slow  # dozens of steps on a cluster
def test_a_long_run_keeps_the_schedulers_key_split_memo_bounded(client, every, monkeypatch):
    """The plugin clears the memo on the scheduler (in this process: a LocalCluster's) as the steps go on."""
    from dask.utils import key_split

    from xopt.engines import dask_amm

    monkeypatch.setattr(dask_amm, "KEY_SPLIT_KEPT", 50)
    run = Run(3)
    sizes = []
    for _ in range(8 * every):
        distributed.wait(run.step())
        sizes.append(client.run_on_scheduler(lambda: key_split.cache_info().currsize))
    assert max(sizes) < 50 + 200, sizes  # at most one graph's keys past the bound
    assert min(sizes[every:]) < 50, sizes  # it was cleared
    run.check()


def test_a_scheduler_without_xopt_warns_of_what_it_costs_once(monkeypatch):
    """Where the scheduler cannot import xopt, one warning per scheduler and setting, naming what is lost: the
    spans trim always, the durable copies' protection only where copies are kept on more than one worker."""
    from xopt.engines import dask_lineage

    class Client:
        calls = 0

        def scheduler_info(self):
            return {"id": "scheduler-1"}

        def run_on_scheduler(self, *args):
            Client.calls += 1
            raise ModuleNotFoundError("No module named 'xopt'")

    monkeypatch.setattr(dask_lineage, "_ASKED", {})
    with pytest.warns(UserWarning, match="No module named 'xopt'") as one:
        assert not dask_lineage._protect(Client(), False)
    assert "Active Memory Manager" not in str(one[0].message) and "spans extension" in str(one[0].message)
    with pytest.warns(UserWarning, match="Active Memory Manager may drop the copies"):
        assert not dask_lineage._protect(Client(), True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not dask_lineage._protect(Client(), True)  # asked once per scheduler and setting
    assert Client.calls == 2


def test_forget_steps_trims_only_xopts_spans():
    """A span of the caller's own that has ``xopt`` among its name's parts keeps its groups; xopt's span (its name's
    last part ``xopt``) loses those the scheduler forgot, keeping one."""
    from types import SimpleNamespace as NS

    from xopt.engines import dask_amm

    class Group:  # hashable, as the scheduler's TaskGroups are
        def __init__(self, name):
            self.name, self.stop = name, 1.0

    held, gone1, gone2 = Group("held"), Group("gone1"), Group("gone2")
    ours = NS(name=("xopt",), groups={held, gone1, gone2}, _metadata=None)
    theirs = NS(name=("xopt", "train"), groups={held, gone1}, _metadata=None)
    spans = NS(spans_search_by_tag={"xopt": [ours, theirs]}, spans={})
    scheduler = NS(extensions={"spans": spans}, task_groups={"held": held}, tasks={})
    assert dask_amm.forget_steps(scheduler) == 2
    assert ours.groups == {held} and theirs.groups == {held, gone1}
