"""pytest-benchmark over the cases of xopt-bench: ``pytest benchmarks/ --benchmark-only``.

Each group is one case; compare the implementations within it.  For the roofline
and the interleaved ratios, run ``xopt-bench``, which these share their cases with.
The loop groups time one training iteration (forward + backward + update of the
book's MultiLayerNet, or the wide net) per implementation; ``xopt-bench --scenario
loop`` times the update apart and interleaves the implementations.
"""

import numpy as np
import pytest

from xopt.bench import loop, runner

CASES = runner.make_cases(["Adam", "RMSprop", "SGD"], ["float32"], [2**20], [2000])


@pytest.mark.parametrize("impl", runner.IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.optimizer}-{c.dtype}-{c.numel}x{c.tensors}")
def test_step(benchmark, case, impl):
    step = runner.make_step(impl, case, np, np.random.default_rng(0))
    if step is None:
        pytest.skip(f"{impl} cannot run {case.optimizer} here")
    benchmark.group = f"{case.optimizer} {case.dtype} {case.numel} elements in {case.tensors} tensors"
    benchmark.pedantic(step, warmup_rounds=2, rounds=20, iterations=1)


LOOP_CASES = [(loop.NETS["book"], "Adam"), (loop.NETS["book"], "SGD"), (loop.NETS["wide"], "Adam")]


@pytest.mark.parametrize("impl", loop.LOOP_IMPLS)
@pytest.mark.parametrize("net, optimizer", LOOP_CASES, ids=lambda x: getattr(x, "name", x))
def test_loop(benchmark, net, optimizer, impl):
    if impl == "torch":
        impl = loop.torch_peer(optimizer)
        if impl is None:
            pytest.skip("torch is not installed")
    trainer = loop.make_trainer(impl, optimizer, net)
    if trainer is None:
        pytest.skip(f"{impl} cannot run {optimizer} here")
    benchmark.group = f"loop {net.name} ({net.label}) {optimizer}: one iteration, forward + backward + update"
    benchmark.extra_info["impl"] = impl
    benchmark.pedantic(trainer.run, args=(1,), warmup_rounds=3, rounds=20 if net.name == "book" else 8,
                       iterations=1)
