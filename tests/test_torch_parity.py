"""Every torch.optim feature xopt claims, to rounding in float64: stored golden trajectories and a live run."""

import json
import pathlib

import numpy as np
import pytest

from torch_cases import CASES, STEPS, inputs, run_torch, run_xopt

GOLDEN = pathlib.Path(__file__).parent / "golden" / "torch_trajectories.npz"
RTOL, ATOL = 1e-12, 1e-14


def _assert_same(got, want, what):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=what)


def _compare(case, ours, theirs):
    (traj, state), (ref_traj, ref_state) = ours, theirs
    for step in range(STEPS):
        for k in ref_traj[step]:
            _assert_same(traj[step][k], ref_traj[step][k], f"{case}: param {k} after step {step + 1}")
    for k, bufs in ref_state.items():
        if CASES[case][4]:
            assert bufs, f"{case}: no state of {k} to compare"
        for name, want in bufs.items():
            _assert_same(state[k][name], want, f"{case}: state {name} of {k}")


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    meta = json.loads(data.pop("meta").tobytes())
    assert sorted(CASES) == meta["cases"], "tests/torch_cases.py changed: run tools/make_golden.py"
    return data


def _golden_inputs(data):
    params = {k[len("input/param/"):]: v for k, v in data.items() if k.startswith("input/param/")}
    grads = [{k: data[f"input/grad/{s}/{k}"] for k in params} for s in range(STEPS)]
    return params, grads


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_stored_torch_trajectory(case, golden, backend):
    params, grads = _golden_inputs(golden)
    ref_traj = [{k: golden[f"{case}/param/{s}/{k}"] for k in params} for s in range(STEPS)]
    ref_state = {k: {name: golden[f"{case}/state/{k}/{name}"] for name in set(CASES[case][4].values())
                     if f"{case}/state/{k}/{name}" in golden} for k in params}
    ours = run_xopt(case, params, grads, backend.asarray, backend.to_numpy)
    _compare(case, ours, (ref_traj, ref_state))


@pytest.mark.torch
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_live(case, rng):
    pytest.importorskip("torch")
    params, grads = inputs(int(rng.integers(2**31)))
    ours = run_xopt(case, params, grads, lambda a: np.array(a, copy=True), lambda a: np.array(a, copy=True))
    _compare(case, ours, run_torch(case, params, grads))
