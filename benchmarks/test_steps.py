"""pytest-benchmark over the cases of xopt-bench: ``pytest benchmarks/ --benchmark-only``.

Each group is one case; compare the implementations within it.  For the roofline
and the interleaved ratios, run ``xopt-bench``, which these share their cases with.
"""

import numpy as np
import pytest

from xopt.bench import runner

CASES = runner.make_cases(["Adam", "RMSprop", "SGD"], ["float32"], [2**20], [2000])


@pytest.mark.parametrize("impl", runner.IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.optimizer}-{c.dtype}-{c.numel}x{c.tensors}")
def test_step(benchmark, case, impl):
    step = runner.make_step(impl, case, np, np.random.default_rng(0))
    if step is None:
        pytest.skip(f"{impl} cannot run {case.optimizer} here")
    benchmark.group = f"{case.optimizer} {case.dtype} {case.numel} elements in {case.tensors} tensors"
    benchmark.pedantic(step, warmup_rounds=2, rounds=20, iterations=1)
