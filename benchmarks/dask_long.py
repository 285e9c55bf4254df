"""A long Adam run on a Dask cluster: the scheduler's tasks, the client's memory, a lost worker, a restart.

    python benchmarks/dask_long.py [--numel 2^22] [--chunks 8] [--steps 2000] [--longer-steps 0] [--every 10]
                                   [--plain-steps 300] [--workers 2] [--log-length N] [--out FILE]

One LocalCluster of ``--workers`` worker processes with 1 thread each (the scheduler runs in this process,
as a LocalCluster's does: its memory is the client's).  Adam on one float32 param of ``--numel`` elements in
``--chunks`` chunks, its grad ``p - target`` (a persisted target), the same steps on NumPy in this process
beside it.  Each step is timed until its chunks are persisted on the workers (``distributed.wait``).

1. ``--plain-steps`` steps with durable points off (``xopt.dask.durable-every`` 0: every step's tasks kept, as
   before durable points): the scheduler's task count and this process's RSS, for comparison.
2. ``--steps`` steps with a durable point every ``--every`` steps: the task count after step 100 and after the
   last, this process's RSS after steps 100, 250, 500, 1000 and the last, the median step, the median step at a
   durable point and between them (the durability's cost, per step: their difference over ``--every``).  With
   each RSS, what the scheduler holds that could grow with the steps: its spans and the task groups they hold
   (kept for as long as the scheduler runs), its task groups, and the histories Dask keeps to a fixed length,
   which fill up over the first hundreds of steps and then stay: the messages each batched stream keeps
   (``distributed.admin.low-level-log-length``, per stream: the client's to the scheduler holds every step's
   pickled graph), the events logged, the system monitor's samples (``distributed.admin.system-monitor``: one
   every 500 ms for an hour).  ``--longer-steps`` N: then on to step N, the same figures after it (growth that
   goes on past the fill, per step, is a leak; a history that fills, stops).
3. A worker killed (SIGKILL; its nanny starts a new one) right after the last step, a durable point: the next
   step, timed, and its p, m and v against NumPy's bit for bit; then ``--every - 1`` steps more (the worst
   place: a step short of the next durable point), another worker killed, the same.
4. ``Client.restart()`` between two steps: the next ``update()`` must raise, naming the lost state, and change
   no count.

Prints what it measured; ``--out`` writes it as JSON, with the command.  The measured code is this checkout's
``xopt`` (the workers import it too).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's xopt, here and (by the spawned workers' sys.path) on the workers

import numpy as np  # noqa: E402

import xopt  # noqa: E402
from xopt.bench.cli import _int  # noqa: E402


def _rss_mib():
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _tasks(client):
    return client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))


def _events(client):
    """How many events the scheduler's log holds (each topic keeps the last distributed.admin.low-level-log-length)."""
    return client.run_on_scheduler(lambda dask_scheduler: sum(
        len(t.events) for t in getattr(getattr(dask_scheduler, "_broker", None), "_topics", {}).values()))


def _held(client):
    """What the scheduler (and this client) holds that may grow with the steps (see the module's docstring)."""

    def on_scheduler(dask_scheduler):
        spans = dask_scheduler.extensions.get("spans")
        broker = getattr(dask_scheduler, "_broker", None)
        return {
            "spans": len(spans.spans) if spans else None,
            "groups_in_spans": sum(len(s.groups) for s in spans.spans.values()) if spans else None,
            "task_groups": len(dask_scheduler.task_groups),
            "events_logged": sum(len(t.events) for t in getattr(broker, "_topics", {}).values()),
            "worker_stream_messages_logged": sum(len(b.recent_message_log) for b in dask_scheduler.stream_comms.values()),
            "client_stream_messages_logged": sum(len(b.recent_message_log) for b in dask_scheduler.client_comms.values()),
            "system_monitor_samples": len(dask_scheduler.monitor.quantities["time"]),
        }

    held = client.run_on_scheduler(on_scheduler)
    held["this_clients_stream_messages_logged"] = len(client.scheduler_comm.recent_message_log)
    return held


class Run:
    def __init__(self, numel, chunks, seed=0):
        import dask.array as da
        import distributed

        rng = np.random.default_rng(seed)
        self.t = rng.standard_normal(numel, dtype=np.float32)
        w0 = rng.standard_normal(numel, dtype=np.float32)
        self.target = da.from_array(self.t, chunks=numel // chunks).persist()
        self.params = {"W": da.from_array(w0.copy(), chunks=numel // chunks).persist()}
        distributed.wait([self.target, self.params["W"]])
        self.opt, self.ref, self.w = xopt.Adam(lr=1e-3), xopt.Adam(lr=1e-3), w0

    def step(self):
        """One step on both, timed (the Dask one until persisted); returns its seconds."""
        import distributed

        t0 = time.perf_counter()
        self.opt.update(self.params, {"W": self.params["W"] - self.target})
        distributed.wait([self.params["W"], *(self.opt.state["W"][n] for n in self.opt.buffers())])
        took = time.perf_counter() - t0
        self.ref.update({"W": self.w}, {"W": self.w - self.t})
        return took

    def same(self):
        if not np.array_equal(self.params["W"].compute(), self.w):
            return False
        return all(np.array_equal(self.opt.state["W"][n].compute(), self.ref.state["W"][n]) for n in self.opt.buffers())


def _kill_one(client):
    pid = list(client.run(os.getpid).values())[0]
    os.kill(pid, signal.SIGKILL)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=_int, default=2**22)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--longer-steps", type=int, default=0,
                    help="then on to this step count, measured again (0: stop at --steps)")
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--plain-steps", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--log-length", type=int, default=None,
                    help="distributed.admin.low-level-log-length (events the scheduler keeps per topic; Dask's "
                         "default 1000)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    import dask
    import distributed

    from xopt.engines.dask_lineage import LostStateError

    out = {"command": "python benchmarks/dask_long.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "numel": args.numel, "chunks": args.chunks, "workers": args.workers, "every": args.every,
           "dask": dask.__version__, "distributed": distributed.__version__, "cpus": os.cpu_count()}
    if args.log_length is not None:
        dask.config.set({"distributed.admin.low-level-log-length": args.log_length})
    out["low_level_log_length"] = dask.config.get("distributed.admin.low-level-log-length")
    cluster = distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", silence_logs=50)
    client = distributed.Client(cluster)
    try:
        if args.plain_steps:
            with dask.config.set({"xopt.dask.durable-every": 0}):
                run = Run(args.numel, args.chunks, seed=1)
                times, tasks, rss = [], {}, {}
                for i in range(1, args.plain_steps + 1):
                    times.append(run.step())
                    if i in (100, args.plain_steps):
                        tasks[i], rss[i] = _tasks(client), _rss_mib()
                out["no_durable_points"] = {
                    "steps": args.plain_steps, "median_step_s": statistics.median(times), "tasks": tasks,
                    "rss_mib": rss, "bit_identical": run.same(),
                    "tasks_per_step": (tasks[args.plain_steps] - tasks[100]) / max(1, args.plain_steps - 100),
                    "rss_kib_per_step": (rss[args.plain_steps] - rss[100]) * 1024 / max(1, args.plain_steps - 100)}
                print("durable points off:", out["no_durable_points"], flush=True)
                del run
            time.sleep(2)

        with dask.config.set({"xopt.dask.durable-every": args.every}):
            run = Run(args.numel, args.chunks)
            times, tasks, rss, events, held = [], {}, {}, {}, {}
            marks = {i for i in (100, 250, 500, 1000) if i < args.steps} | {args.steps}
            for i in range(1, args.steps + 1):
                times.append(run.step())
                if i in marks:
                    tasks[i], rss[i] = _tasks(client), _rss_mib()
                    events[i], held[i] = _events(client), _held(client)
                if i % 250 == 0:
                    print(f"step {i}: {statistics.median(times[-250:]) * 1e3:.1f} ms median, {_tasks(client)} tasks, "
                          f"{_rss_mib():.1f} MiB, {_held(client)}", flush=True)
            at_point = [t for i, t in enumerate(times, 1) if i % args.every == 0]
            between = [t for i, t in enumerate(times, 1) if i % args.every]
            median = statistics.median(times)
            out["durable"] = {
                "steps": args.steps, "tasks": tasks, "rss_mib": rss, "scheduler_events_logged": events,
                "median_step_s": median,
                "median_step_at_durable_point_s": statistics.median(at_point),
                "median_step_between_s": statistics.median(between),
                "durability_cost_per_step_s": (statistics.median(at_point) - statistics.median(between)) / args.every,
                "tasks_last_over_100": tasks[args.steps] / tasks[100],
                "rss_growth_250_to_last_mib": rss[args.steps] - rss[250],
                "rss_kib_per_step_250_to_last": (rss[args.steps] - rss[250]) * 1024 / (args.steps - 250),
                "rss_kib_per_step_1000_to_last": ((rss[args.steps] - rss[1000]) * 1024 / (args.steps - 1000)
                                                  if 1000 in rss else None),
                "held": held,
                "bit_identical_before_kill": run.same()}
            print("durable points:", out["durable"], flush=True)
            if args.longer_steps > args.steps:
                longer = []
                for i in range(args.steps + 1, args.longer_steps + 1):
                    longer.append(run.step())
                    if i % 500 == 0:
                        print(f"step {i}: {statistics.median(longer[-500:]) * 1e3:.1f} ms median, {_tasks(client)} "
                              f"tasks, {_rss_mib():.1f} MiB, {_held(client)}", flush=True)
                last = args.longer_steps
                tasks[last], rss[last], held[last] = _tasks(client), _rss_mib(), _held(client)
                out["longer"] = {
                    "steps": last, "tasks": tasks[last], "rss_mib": rss[last], "held": held[last],
                    "median_step_s": statistics.median(longer),
                    "rss_growth_from_steps_mib": rss[last] - rss[args.steps],
                    "rss_kib_per_step_from_steps": (rss[last] - rss[args.steps]) * 1024 / (last - args.steps),
                    "bit_identical": run.same()}
                print("longer:", out["longer"], flush=True)

            kills = []
            for where in (0, args.every - 1):  # right after a durable point, a step short of the next
                while run.opt.state["W"]["step"] % args.every != where:
                    run.step()
                step_count = run.opt.state["W"]["step"]
                _kill_one(client)
                try:
                    took = run.step()
                except LostStateError as exc:  # both copies of the last durable point lost (a second kill)
                    kills.append({"killed_after_step": step_count, "raised": f"{type(exc).__name__}: {exc}"})
                    print("worker killed:", kills[-1], flush=True)
                    break
                kills.append({"killed_after_step": step_count, "steps_since_durable_point": step_count % args.every,
                              "next_step_s": took, "over_median": took / median, "bit_identical": run.same()})
                print("worker killed:", kills[-1], flush=True)
                client.wait_for_workers(args.workers, timeout=120)
                time.sleep(1)
            out["kills"] = kills

            before = (run.opt.iter, run.opt.state["W"]["step"], run.params["W"])
            t0 = time.perf_counter()
            client.restart(wait_for_workers=False)
            try:
                client.wait_for_workers(1, timeout=120)
            except TimeoutError:
                pass
            out["restart_s"] = time.perf_counter() - t0
            try:
                run.opt.update(run.params, {"W": run.params["W"] - run.target})
                restart = {"raised": None}
            except LostStateError as exc:
                restart = {"raised": f"{type(exc).__name__}: {exc}"}
            restart["counts_unchanged"] = (run.opt.iter, run.opt.state["W"]["step"]) == before[:2]
            restart["param_unchanged"] = run.params["W"] is before[2]
            out["restart"] = restart
            print("after a restart:", restart, flush=True)
    finally:
        client.close()
        cluster.close()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
    return out


if __name__ == "__main__":
    main()
