"""The loop users run: forward, backward and update of a NumPy MLP, timed per implementation.

The net is the book's ``MultiLayerNet``: affine layers with ReLU between them,
softmax-with-cross-entropy at the end, params ``W1..Wn``, ``b1..bn`` in a dict,
He initialisation, and a backward pass that makes fresh grad arrays every
iteration (``x.T @ dout``, ``dout.sum(axis=0)``), as the book's does.

One iteration = forward + backward + update.  Two clocks run in each:
``perf_counter`` around the update call alone, and around the whole iteration.
Implementations run in rounds: each round runs a block of iterations of every
implementation in turn, in an order rotated from round to round, and each row
reports the median over rounds of the per-iteration means within a block (with
the min, max and quartiles over rounds).  Every implementation trains its own
copy of the same initial params on the same batches, so after the same number of
iterations their params must agree: the rows record how far each one is from the
seed's, and the loss at the first and the last iteration.

No thread count is set anywhere (not OpenBLAS's, numba's, OpenMP's or torch's):
the matmuls, xopt's numba kernel and torch's pool share the cores as they do for
a user, and the run records what it found (``threads_info``).

torch peers: ``torch.optim.X(fused=True)`` where torch has a fused kernel for it on
this device, else ``foreach=True``; the row's impl says which.  torch's tensors
share memory with the NumPy params (``torch.from_numpy``), and each update hands
torch the new grads (``p.grad = torch.from_numpy(g)``) inside the timed call.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import numpy as np

from . import seed
from .runner import settled, spread

__all__ = ["Net", "NETS", "LOOP_IMPLS", "LOOP_OPTIMIZERS", "threads_info", "make_trainer", "measure_loop",
           "loop_rows"]

# What the loop runs: xopt's default (impl="auto"), its array-API reference rule, the seed, torch.optim.
LOOP_IMPLS = ("xopt", "xopt-reference", "seed", "torch")
LOOP_OPTIMIZERS = ("SGD", "Momentum", "AdaGrad", "RMSprop", "Adam")  # the seed's, which torch.optim has too

# torch.optim with the seed's rule: its defaults, and eps where the seed's differs from torch's.
TORCH_LOOP = {
    "SGD": ("SGD", dict(lr=0.01)),
    "Momentum": ("SGD", dict(lr=0.01, momentum=0.9)),  # torch's buf = 0.9 buf + g, p -= lr buf: the seed's v / -lr
    "AdaGrad": ("Adagrad", dict(lr=0.01, eps=1e-7)),
    "RMSprop": ("RMSprop", dict(lr=0.01, alpha=0.99, eps=1e-7)),
    "Adam": ("Adam", dict(lr=0.001, eps=1e-7)),  # eps added to sqrt(v_hat), the seed's to sqrt(v): a hair apart
}


@dataclass(frozen=True)
class Net:
    """A MultiLayerNet: layer widths (input first, classes last), batch size, dtype, iterations per block."""

    name: str
    sizes: tuple
    batch: int
    dtype: str
    block: int  # iterations per implementation per round
    optimizers: tuple = LOOP_OPTIMIZERS  # those this net runs by default
    samples: int = 1000  # the synthetic training set cycled through

    @property
    def params(self):
        return sum(a * b + b for a, b in zip(self.sizes[:-1], self.sizes[1:]))

    @property
    def label(self):
        return f"{'-'.join(map(str, self.sizes))}, batch {self.batch}, {self.dtype}"


NETS = {
    # the book's: 8x8 digits in, 4 hidden layers of 100, 10 classes; 37,810 params
    "book": Net("book", (64, 100, 100, 100, 100, 10), 100, "float64", block=20),
    # wide: 5.8M float32 params, where the update's memory traffic competes with large matmuls
    "wide": Net("wide", (784, 2048, 2048, 10), 128, "float32", block=3, optimizers=("Adam",), samples=1024),
}


def threads_info():
    """What sets the threads here: numba's layer and count, NumPy's BLAS (via threadpoolctl, if installed), cores."""
    info = {"cpu_count": os.cpu_count()}
    try:
        info["sched_getaffinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    info["env"] = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                              "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "XOPT_NUM_THREADS")
                   if k in os.environ}
    from .. import _numba, _threads

    info["xopt_num_threads"] = _threads.get_num_threads()  # its kernels' own pool (numba's count is not it)

    if _numba.usable():  # numba's code runs here
        import numba

        info["numba_num_threads"] = int(numba.get_num_threads())
        try:
            info["numba_threading_layer"] = numba.threading_layer()
        except ValueError:  # no parallel kernel has run yet in this process
            info["numba_threading_layer"] = f"not yet chosen (configured: {numba.config.THREADING_LAYER})"
    try:
        import threadpoolctl
    except ImportError:
        info["threadpools"] = "threadpoolctl not installed"
    else:
        info["threadpools"] = [{k: p.get(k) for k in ("user_api", "internal_api", "num_threads", "version",
                                                      "threading_layer", "architecture", "filepath")}
                               for p in threadpoolctl.threadpool_info()]
    try:
        import torch
    except ImportError:
        pass
    else:
        info["torch_num_threads"] = int(torch.get_num_threads())
    return info


def init_params(net, rng):
    """He initialisation (the book's weight_init_std='relu'), zero biases."""
    params = {}
    for i, (n_in, n_out) in enumerate(zip(net.sizes[:-1], net.sizes[1:]), start=1):
        params[f"W{i}"] = (np.sqrt(2.0 / n_in) * rng.standard_normal((n_in, n_out))).astype(net.dtype)
        params[f"b{i}"] = np.zeros(n_out, dtype=net.dtype)
    return params


def make_batches(net, rng):
    """A learnable synthetic set (labels from a random linear teacher), cut into batches, cycled through."""
    x = rng.standard_normal((net.samples, net.sizes[0])).astype(net.dtype)
    teacher = rng.standard_normal((net.sizes[0], net.sizes[-1]))
    t = np.argmax(x @ teacher, axis=1)
    return [(np.ascontiguousarray(x[i:i + net.batch]), t[i:i + net.batch])
            for i in range(0, net.samples - net.batch + 1, net.batch)]


def loss_and_grads(params, x, t, layers):
    """Forward and backward of the MultiLayerNet: (loss, {name: fresh grad array})."""
    hs, masks = [x], []
    h = x
    for i in range(1, layers):
        a = h @ params[f"W{i}"] + params[f"b{i}"]
        mask = a <= 0  # Relu
        a[mask] = 0
        masks.append(mask)
        hs.append(a)
        h = a
    y = h @ params[f"W{layers}"] + params[f"b{layers}"]
    y -= y.max(axis=1, keepdims=True)  # SoftmaxWithLoss
    np.exp(y, out=y)
    y /= y.sum(axis=1, keepdims=True)
    rows = np.arange(x.shape[0])
    loss = float(-np.mean(np.log(y[rows, t] + 1e-7)))
    dout = y
    dout[rows, t] -= 1
    dout /= x.shape[0]
    grads = {}
    for i in range(layers, 0, -1):
        grads[f"W{i}"] = hs[i - 1].T @ dout
        grads[f"b{i}"] = dout.sum(axis=0)
        if i > 1:
            dout = dout @ params[f"W{i}"].T
            dout[masks[i - 2]] = 0
    return loss, {k: grads[k] for k in params}  # the params' order


def torch_peer(optimizer):
    """'torch-fused' where torch.optim has a fused CPU kernel for ``optimizer``, 'torch-foreach' otherwise;
    None without torch."""
    try:
        import torch
    except ImportError:
        return None
    name, kwargs = TORCH_LOOP[optimizer]
    t = torch.zeros(2)
    t.grad = torch.ones(2)
    try:
        getattr(torch.optim, name)([t], **kwargs, fused=True).step()
    except (RuntimeError, TypeError, ValueError):
        return "torch-foreach"
    return "torch-fused"


class Trainer:
    """One implementation's copy of the net: ``run(n)`` trains n iterations and returns the two clocks' sums."""

    def __init__(self, net, params, batches, update):
        self.net, self.params, self.batches, self.update = net, params, batches, update
        self.layers = len(net.sizes) - 1
        self.i = 0
        self.losses = []

    def run(self, n):
        clock = time.perf_counter
        params, layers, batches, update = self.params, self.layers, self.batches, self.update
        update_s = iteration_s = 0.0
        for _ in range(n):
            x, t = batches[self.i % len(batches)]
            t0 = clock()
            loss, grads = loss_and_grads(params, x, t, layers)
            t1 = clock()
            update(params, grads)
            t2 = clock()
            update_s += t2 - t1
            iteration_s += t2 - t0
            self.i += 1
            self.losses.append(loss)
        return update_s, iteration_s


def make_trainer(impl, optimizer, net, seed_=0):
    """A Trainer for ``impl`` ('xopt', 'xopt-reference', 'seed', 'torch-fused', 'torch-foreach'), or None if it
    can't run here.  Every impl gets the same initial params and batches (from ``seed_``)."""
    rng = np.random.default_rng(seed_)
    params = init_params(net, rng)
    batches = make_batches(net, rng)
    if impl == "seed":
        update = getattr(seed, optimizer)().update
    elif impl in ("xopt", "xopt-reference"):
        import xopt

        options = {"impl": "reference"} if impl == "xopt-reference" else {}  # "xopt": the default, impl="auto"
        update = getattr(xopt, optimizer)(**options).update
    elif impl in ("torch-fused", "torch-foreach"):
        try:
            import torch
        except ImportError:
            return None
        name, kwargs = TORCH_LOOP[optimizer]
        keys = list(params)
        tensors = [torch.from_numpy(params[k]) for k in keys]  # share memory: torch's step writes the NumPy params
        flavour = {"torch-fused": dict(fused=True), "torch-foreach": dict(foreach=True)}[impl]
        try:
            opt = getattr(torch.optim, name)(tensors, **kwargs, **flavour)
        except (RuntimeError, TypeError, ValueError):
            return None
        from_numpy = torch.from_numpy

        def update(params, grads, tensors=tensors, keys=keys, step=opt.step):
            for tensor, k in zip(tensors, keys):
                tensor.grad = from_numpy(grads[k])
            step()
    else:
        raise ValueError(f"unknown loop impl {impl!r}")
    return Trainer(net, params, batches, update)


def measure_loop(optimizer, net, impls, rounds, warmup_seconds=2.0, warmup_rounds=(2, 8), tolerance=0.10,
                 seed_=0):
    """{impl: {"update": [s per iteration, one per round], "iteration": [...], "trainer": Trainer}}.

    Warm-up, outside the figures: one iteration of each impl, then whole interleaved rounds, at least
    ``warmup_rounds[0]`` and until every impl's iteration time agrees with its previous round's within
    ``tolerance``, or ``warmup_rounds[1]`` rounds or ``warmup_seconds`` have passed.
    Every impl runs the same number of iterations in all.
    """
    trainers = {}
    for impl in impls:
        if impl == "torch":
            impl = torch_peer(optimizer)
            if impl is None:
                continue
        trainer = make_trainer(impl, optimizer, net, seed_)
        if trainer is not None:
            trainers[impl] = trainer
    order = list(trainers)
    for impl in order:  # first calls: lazy loads (numba's cache, torch's kernels) take seconds, outside the budget
        trainers[impl].run(1)
    history = {impl: [] for impl in order}
    t_end = time.perf_counter() + warmup_seconds
    done = 0
    while done < warmup_rounds[1]:
        for impl in order:
            history[impl].append(trainers[impl].run(net.block)[1])
        done += 1
        if done >= warmup_rounds[0] and (all(settled(h, tolerance) for h in history.values())
                                         or time.perf_counter() > t_end):
            break
    samples = {impl: {"update": [], "iteration": []} for impl in order}
    for r in range(rounds):
        k = r % len(order)
        for impl in order[k:] + order[:k]:  # rotated: no impl always follows the same one
            # Two iterations untimed first: the block before may leave threads spinning (torch's OpenMP
            # pool spins after its steps), which would slow whatever comes next, not what a user's own
            # loop sees.  (Rotated, xopt followed torch in 3 rounds of 4 and read 10-20 % slower.)
            trainers[impl].run(2)
            update_s, iteration_s = trainers[impl].run(net.block)
            samples[impl]["update"].append(update_s / net.block)
            samples[impl]["iteration"].append(iteration_s / net.block)
    for impl in order:
        samples[impl]["trainer"] = trainers[impl]
        samples[impl]["warmup_rounds"] = done
    return samples


def _max_rel_diff(params, reference):
    """Largest |p - p_ref| over all params, relative to the largest |p_ref| of that param."""
    worst = 0.0
    for k, ref in reference.items():
        scale = float(np.max(np.abs(ref))) or 1.0
        worst = max(worst, float(np.max(np.abs(params[k].astype(np.float64) - ref))) / scale)
    return worst


def loop_rows(optimizer, net, impls, rounds, **options):
    """The JSON rows of one (optimizer, net) loop case: medians, spread, ratios, losses, agreement with the seed."""
    samples = measure_loop(optimizer, net, impls, rounds, **options)
    medians = {impl: {kind: statistics.median(s[kind]) for kind in ("update", "iteration")}
               for impl, s in samples.items()}
    peer = next((impl for impl in samples if impl.startswith("torch")), None)
    reference = samples.get("seed", {}).get("trainer")
    reference = {k: v.astype(np.float64) for k, v in reference.params.items()} if reference else None
    rows = []
    for impl, s in samples.items():
        m = medians[impl]
        trainer = s["trainer"]
        row = {"scenario": "loop", "net": net.name, "net_layers": "-".join(map(str, net.sizes)),
               "batch": net.batch, "dtype": net.dtype, "params": net.params, "tensors": 2 * (len(net.sizes) - 1),
               "optimizer": optimizer, "impl": impl, "rounds": rounds, "block": net.block,
               "warmup_rounds": s["warmup_rounds"], "iterations": trainer.i,
               "update_ms": m["update"] * 1e3, "iteration_ms": m["iteration"] * 1e3,
               "update_share": m["update"] / m["iteration"],
               "update_ms_spread": {k: v * 1e3 for k, v in spread(s["update"]).items()},
               "iteration_ms_spread": {k: v * 1e3 for k, v in spread(s["iteration"]).items()},
               "loss_first": trainer.losses[0], "loss_last": trainer.losses[-1],
               "params_max_rel_diff_vs_seed": None if reference is None else _max_rel_diff(trainer.params, reference),
               "torch_peer": peer}
        for other, name in (("seed", "seed"), (peer, "torch")):
            o = medians.get(other)
            # 'vs X' = X's time / this row's time, as in the step table (above 1: this row is faster)
            row[f"update_vs_{name}"] = o["update"] / m["update"] if o else None
            row[f"iteration_vs_{name}"] = o["iteration"] / m["iteration"] if o else None
        rows.append(row)
    return rows
