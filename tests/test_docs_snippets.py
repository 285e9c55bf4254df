"""Every ``python`` block of the README and the docs runs against the current API.

A block is a fragment of a user's program: it may use names the text around it defines (``optimizer``,
``params``, a torch ``model``/``net``, ``batches``).  Each runs in a fresh namespace after a preamble that
defines them, chosen by what the block mentions: the quickstart's NumPy run always (its ``optimizer`` has
stepped ``params``), a small torch model with grads where the block names ``net`` or ``model``, jax arrays as
``params``/``grads`` where it names optax.  Blocks of interpreter output (``>>>``, a GPU's) and snippet
includes (``--8<--``, whose files the examples' tests run) are not run; a Dask block starts a cluster (slow).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

NUMPY = '''
import numpy as np
import xopt
from xopt import *
rng = np.random.default_rng(0)
x, t = rng.standard_normal((100, 3)), rng.standard_normal((100, 1))
params = {"W": np.zeros((3, 1)), "b": np.zeros(1)}
optimizer = Adam(lr=0.1)
for i in range(3):
    err = x @ params["W"] + params["b"] - t
    grads = {"W": 2 * x.T @ err / len(x), "b": 2 * err.mean(0)}
    optimizer.update(params, grads)
'''

TORCH = '''
import torch
import xopt.torch
torch.manual_seed(0)
net = model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
loss_fn = torch.nn.functional.mse_loss
batches = [(torch.randn(16, 4), torch.randn(16, 2)) for _ in range(3)]
loss_fn(model(batches[0][0]), batches[0][1]).backward()
optimizer = Adam(lr=1e-3)
'''

OPTAX = '''
import jax.numpy as jnp
import optax
import xopt.optax
params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
grads = {"w": jnp.full((3, 2), 0.5), "b": jnp.ones(2)}
'''


def _blocks():
    found = []
    for path in FILES:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S)):
            if block.lstrip().startswith((">>>", "--8<--")):
                continue
            marks = [pytest.mark.slow] if "LocalCluster" in block else []
            found.append(pytest.param(block, id=f"{path.relative_to(ROOT)}[{i}]", marks=marks))
    return found


BLOCKS = _blocks()


def test_the_docs_have_python_blocks_to_run():
    assert len(BLOCKS) >= 8


@pytest.mark.parametrize("block", BLOCKS)
def test_a_python_block_of_the_docs_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block may write files (opt.npz)
    preamble = NUMPY
    if re.search(r"\b(net|model)\b", block):
        pytest.importorskip("torch")
        preamble += TORCH
    if "optax" in block:
        pytest.importorskip("optax")
        preamble += OPTAX
    if "dask" in block:
        pytest.importorskip("distributed")
    namespace = {"__name__": "__main__"}
    exec(compile(preamble, "<preamble>", "exec"), namespace)
    exec(compile(block, "<docs block>", "exec"), namespace)
