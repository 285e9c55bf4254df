"""xopt-bench: the results JSON follows the schema, the plots are written, the roofline counts bytes right,
and the loop scenario trains the same net alike with every implementation."""

import dataclasses
import json
import math

import numpy as np
import pytest

from xopt.bench import cli, loop, muon, report, roofline, runner

SCHEMA_TOP = {"commit": str, "device": str, "backend": str, "date": str, "copy_GBps": float, "versions": dict,
              "rows": list}
SCHEMA_ROW = {"scenario": str, "optimizer": str, "impl": str, "dtype": str, "numel": int, "tensors": int,
              "seconds": float, "seconds_spread": dict, "GBps": float, "roofline_fraction": float,
              "state_bytes_per_param": float}
SCHEMA_LOOP_ROW = {"scenario": str, "net": str, "net_layers": str, "batch": int, "dtype": str, "params": int,
                   "optimizer": str, "impl": str, "rounds": int, "block": int, "iterations": int, "update_ms": float,
                   "iteration_ms": float, "update_ms_spread": dict, "iteration_ms_spread": dict,
                   "update_vs_seed": float, "iteration_vs_seed": float, "loss_first": float, "loss_last": float,
                   "params_max_rel_diff_vs_seed": float}
LOOP_IMPLS_HERE = {"xopt", "xopt-reference", "seed"}
try:
    import torch  # noqa: F401
except ImportError:
    HAVE_TORCH = False
else:
    HAVE_TORCH = True


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("bench")
    cli.main(["--device", "cpu", "--optimizers", "Adam,SGD", "--sizes", "2^10,5000", "--tensors", "30",
              "--repeat", "2", "--nets", "book", "--block", "2", "--muon", "3x16x24,2x24x16", "--out", str(out)])
    return out, json.loads((out / "results.json").read_text())


def test_results_follow_the_schema(small_run):
    _, result = small_run
    for key, kind in SCHEMA_TOP.items():
        assert isinstance(result[key], kind), key
    assert result["backend"] == "numpy" and result["copy_GBps"] > 0
    assert result["commit"] == "unknown" or len(result["commit"].split("-")[0]) == 40
    for row in report.step_rows(result):
        assert row["scenario"] == "step"
        spread = row["seconds_spread"]
        assert spread["min"] <= spread["q1"] <= row["seconds"] <= spread["q3"] <= spread["max"]
        for key, kind in SCHEMA_ROW.items():
            assert isinstance(row[key], kind), (key, row)
        assert row["impl"] in runner.IMPLS
        assert row["seconds"] > 0
        nbytes = roofline.bytes_per_element(row["optimizer"], row["dtype"], runner.STATE_DTYPES.get(row["impl"]))
        want = nbytes * row["numel"] / row["seconds"] / 1e9
        assert row["GBps"] == pytest.approx(want)
        assert row["roofline_fraction"] == pytest.approx(row["GBps"] / result["copy_GBps"])


def test_rows_cover_every_case_and_impl(small_run):
    _, result = small_run
    impls = {"xopt", "xopt-reference", "seed"}
    try:
        import torch  # noqa: F401
        impls |= {"torch-fused", "torch-foreach", "torch-forloop"}
    except ImportError:
        pass
    rows = report.step_rows(result)
    assert {r["scenario"] for r in result["rows"]} == {"step", "loop", "muon"}
    cases = {(r["optimizer"], r["numel"], r["tensors"]) for r in rows}
    assert {(o, t) for o, _, t in cases} == {("Adam", 1), ("SGD", 1), ("Adam", 30), ("SGD", 30)}
    for case in cases:
        got = {r["impl"] for r in rows if (r["optimizer"], r["numel"], r["tensors"]) == case}
        assert impls <= got, (case, got)
        assert ("xopt-bf16-state" in got) == (case[0] == "Adam"), (case, got)
        # 8-bit state: one tensor of at least min_8bit_size (smaller ones keep float32 state); SGD keeps none
        assert ("xopt-8bit-state" in got) == (case[0] == "Adam" and case[1] >= 4096 and case[2] == 1), (case, got)


def test_plots_are_pngs(small_run):
    out, _ = small_run
    for name in ("throughput.png", "many_tensors.png", "loop.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


@pytest.mark.parametrize("optimizer, dtype, expected", [
    ("Adam", "float32", 28),  # read p, g, m, v; write p, m, v
    ("AdamW", "float64", 56),
    ("SGD", "float32", 12),  # read p, g; write p
    ("RMSprop", "float32", 20),
    ("Adam", "float16", 2 * 3 + 4 * 4),  # float16 p and g, float32 m and v
])
def test_bytes_per_element(optimizer, dtype, expected):
    assert roofline.bytes_per_element(optimizer, dtype) == expected


def test_bytes_per_element_with_bfloat16_state():
    assert roofline.bytes_per_element("Adam", "float32", "bfloat16") == 3 * 4 + 2 * 2 * 2  # 20, not 28


def test_bytes_per_element_with_8bit_state():
    # p, g read, p written; m and v: a code each, read and written, and a float32 absmax per 256 elements
    assert roofline.bytes_per_element("Adam", "float32", "8bit") == 3 * 4 + 2 * 2 * (1 + 4 / 256)


@pytest.mark.parametrize("optimizer, state_dtype", [("Adam", "8bit"), ("Lion", "8bit"), ("Adam", "bfloat16"),
                                                    ("Adam", None), ("RMSprop", None)])
def test_state_bytes_per_element_are_an_optimizers_own(optimizer, state_dtype):
    import xopt

    n = 1 << 16
    opt = getattr(xopt, optimizer)(**({"state_dtype": state_dtype} if state_dtype else {}))
    opt.update({"p": np.ones(n, np.float32)}, {"p": np.ones(n, np.float32)})
    kept = sum(buf.nbytes for name, buf in opt.state["p"].items() if name != "step")
    assert roofline.state_bytes_per_element(optimizer, "float32", state_dtype) == kept / n


def test_many_tensor_cases_draw_small_tensors():
    (case,) = runner.make_cases(["Adam"], ["float32"], [], [2000])
    assert case.tensors == 2000
    assert all(runner.SMALL_TENSOR_SIZES[0] <= n <= runner.SMALL_TENSOR_SIZES[1] for n in case.sizes)


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--optimizers", "Adafactor"])
    assert "Adafactor" in capsys.readouterr().err


def test_none_skips_a_list_and_a_bad_count_is_named(capsys):
    """``--tensors none`` (the help's way to skip the many-tensors cases) was refused as "invalid <lambda> value"."""
    args = cli.parse_args(["--tensors", "none", "--sizes", "2^10,4096"])
    assert args.tensors == [] and args.sizes == [1024, 4096]
    with pytest.raises(SystemExit):
        cli.parse_args(["--sizes", "2^x"])
    err = capsys.readouterr().err
    assert "--sizes" in err and "'2^x'" in err and "<lambda>" not in err


# --- Muon's rows -------------------------------------------------------------------------------------------------

def test_muon_rows_of_the_small_run(small_run):
    """--muon 3x16x24,2x24x16: per case a matmul row (the peak), xopt's and torch's (where torch has Muon), with
    GFLOP/s from the nominal Newton-Schulz flops."""
    _, result = small_run
    rows = [r for r in result["rows"] if r["scenario"] == "muon"]
    cases = {(r["matrices"], r["rows"], r["cols"]) for r in rows}
    assert cases == {(3, 16, 24), (2, 24, 16)}
    for case in cases:
        mine = {r["impl"]: r for r in rows if (r["matrices"], r["rows"], r["cols"]) == case}
        want = {"matmul", "xopt"} | ({"torch"} if HAVE_TORCH and hasattr(torch.optim, "Muon") else set())
        assert set(mine) == want
        count, m, n = case
        peak = count * 2 * m * m * n / mine["matmul"]["seconds"]
        assert mine["matmul"]["peak_fraction"] == pytest.approx(1.0)
        for impl, r in mine.items():
            spread = r["seconds_spread"]
            assert spread["min"] <= r["seconds"] <= spread["max"] and r["rounds"] == 2
            work = count * 2 * m * m * n if impl == "matmul" else count * muon.ns_flops(m, n, r["ns_steps"])
            assert r["GFLOPs"] == pytest.approx(work / r["seconds"] / 1e9)
            assert r["peak_fraction"] == pytest.approx(work / r["seconds"] / peak)
    assert "Newton-Schulz" in report.table(result)


@pytest.mark.parametrize("shape", [(16, 24), (24, 16), (8, 8)])
def test_muon_flops_count_every_product_of_the_iteration(shape):
    """ns_flops against the products orthogonalize makes, counted as it runs (2 M K N each)."""
    from xopt.optimizers.muon import NS_COEFFICIENTS, orthogonalize

    counted = []

    class Counting:
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def matmul(a, b):
            counted.append(2 * a.shape[-2] * a.shape[-1] * b.shape[-1])
            return np.matmul(a, b)

    orthogonalize(Counting(), np.ones(shape), NS_COEFFICIENTS, 5, 1e-7)
    assert sum(counted) == muon.ns_flops(*shape, 5)


def test_muon_shapes_are_checked():
    assert muon.parse_shape("12x768x768") == (12, 768, 768)
    for bad in ("12x768", "0x4x4", "ax4x4", "3x-4x4"):
        with pytest.raises(ValueError, match="COUNTxROWSxCOLS"):
            muon.parse_shape(bad)


# --- the loop scenario -------------------------------------------------------------------------------------------

TINY = loop.Net("tiny", (12, 16, 16, 4), 8, "float64", block=3, samples=64)


def test_loop_rows_of_the_small_run(small_run):
    """--nets book --optimizers Adam,SGD: the book net, both optimizers, every loop impl, in the schema."""
    _, result = small_run
    rows = report.loop_rows(result)
    impls = LOOP_IMPLS_HERE | ({"torch-fused"} if HAVE_TORCH else set())
    assert {(r["net"], r["optimizer"]) for r in rows} == {("book", "Adam"), ("book", "SGD")}
    for opt in ("Adam", "SGD"):
        assert {r["impl"] for r in rows if r["optimizer"] == opt} == impls
    for row in rows:
        for key, kind in SCHEMA_LOOP_ROW.items():
            assert isinstance(row[key], kind), (key, row)
        assert row["net_layers"] == "64-100-100-100-100-10" and row["batch"] == 100 and row["dtype"] == "float64"
        assert row["params"] == 37_810 and row["tensors"] == 10
        assert row["rounds"] == 2 and row["block"] == 2
        # one first call, blocks of 2 in warm-up rounds, 2 untimed + a block of 2 in each timed round
        assert row["iterations"] == 1 + 2 * row["warmup_rounds"] + (2 + 2) * row["rounds"]
        assert 0 < row["update_ms"] < row["iteration_ms"] and math.isfinite(row["iteration_ms"])
        assert row["update_share"] == pytest.approx(row["update_ms"] / row["iteration_ms"])
        for kind in ("update", "iteration"):
            sp = row[f"{kind}_ms_spread"]
            assert sp["min"] <= row[f"{kind}_ms"] <= sp["max"]
            seed_row = next(r for r in rows if r["optimizer"] == row["optimizer"] and r["impl"] == "seed")
            assert row[f"{kind}_vs_seed"] == pytest.approx(seed_row[f"{kind}_ms"] / row[f"{kind}_ms"])
        assert (row["torch_peer"] == "torch-fused") == HAVE_TORCH
    threads = result["threads"]
    assert threads["cpu_count"] >= 1 and "threadpools" in threads
    assert "numba_num_threads" in threads and "numba_threading_layer" in threads
    text = report.table(result)
    assert "loop:" in text and "book  Adam" in text


def test_loop_runs_every_impl_with_finite_times():
    impls = loop.LOOP_IMPLS
    rows = loop.loop_rows("Adam", TINY, impls, rounds=2, warmup_rounds=(1, 2))
    got = {r["impl"] for r in rows}
    assert got == LOOP_IMPLS_HERE | ({"torch-fused"} if HAVE_TORCH else set())
    for r in rows:
        for key in ("update_ms", "iteration_ms"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["scenario"] == "loop" and r["net"] == "tiny"
        assert r["params"] == 12 * 16 + 16 + 16 * 16 + 16 + 16 * 4 + 4


@pytest.mark.parametrize("optimizer", loop.LOOP_OPTIMIZERS)
def test_loop_trains_and_every_impl_lands_on_the_seeds_params(optimizer):
    """Same init, same batches, same number of iterations: the same params (torch.optim's eps sits a hair
    elsewhere for Adam, AdaGrad and RMSprop; its SGD and momentum are the seed's rule), and a lower loss."""
    net = dataclasses.replace(TINY, block=10)
    samples = loop.measure_loop(optimizer, net, ["seed", "xopt", "xopt-reference", "torch"], rounds=3,
                                warmup_rounds=(1, 1))
    trainers = {impl: s["trainer"] for impl, s in samples.items()}
    seed_params = trainers["seed"].params
    init = loop.init_params(net, np.random.default_rng(0))
    for impl, trainer in trainers.items():
        assert trainer.i == 1 + 10 + 3 * (2 + 10)  # first call, one warm-up round, 3 rounds of 2 untimed + 10
        exact = impl.startswith("xopt") or optimizer in ("SGD", "Momentum")
        for k, ref in seed_params.items():
            moved = float(np.max(np.abs(ref - init[k])))
            assert moved > 0, k  # training changed every param
            diff = float(np.max(np.abs(trainer.params[k] - ref)))
            # the same rule: equal to rounding; torch's eps elsewhere: within 5 % of how far the seed moved
            assert diff <= (1e-12 if exact else 0.05 * moved), (impl, k, diff, moved)
        first, last = np.mean(trainer.losses[:4]), np.mean(trainer.losses[-4:])
        assert last < first, (impl, trainer.losses)


def test_loop_grads_are_the_derivative_of_the_loss():
    """The benchmark's backward pass is right: a central difference on a few entries of every param."""
    net = loop.Net("check", (5, 7, 6, 3), 4, "float64", block=1, samples=4)
    rng = np.random.default_rng(3)
    params = loop.init_params(net, rng)
    for k in params:
        params[k] += 0.1 * rng.standard_normal(params[k].shape)  # nonzero biases
    x, t = loop.make_batches(net, rng)[0]
    _, grads = loop.loss_and_grads(params, x, t, 3)
    assert list(grads) == list(params)
    for k, p in params.items():
        for idx in list(np.ndindex(p.shape))[:5]:
            old = p[idx]
            p[idx] = old + 1e-6
            up, _ = loop.loss_and_grads(params, x, t, 3)
            p[idx] = old - 1e-6
            down, _ = loop.loss_and_grads(params, x, t, 3)
            p[idx] = old
            assert grads[k][idx] == pytest.approx((up - down) / 2e-6, rel=1e-4, abs=1e-7), (k, idx)


def test_loop_cases_follow_the_arguments():
    full = cli.parse_args([])
    assert [(n.name, o) for n, o in cli.loop_cases_of(full)] == (
        [("book", o) for o in loop.LOOP_OPTIMIZERS] + [("wide", "Adam")])
    quick = cli.parse_args(["--quick"])
    assert [(n.name, n.block, o) for n, o in cli.loop_cases_of(quick)] == [("book", 10, "Adam"), ("wide", 1, "Adam")]
    given = cli.parse_args(["--optimizers", "SGD,AdamW", "--nets", "wide", "--block", "2"])
    assert [(n.name, n.block, o) for n, o in cli.loop_cases_of(given)] == [("wide", 2, "SGD")]
    with pytest.raises(SystemExit):
        cli.parse_args(["--nets", "huge"])


def test_a_run_compiles_the_kernels_it_calls_and_no_others():
    quick = cli.parse_args(["--quick"])
    cases = runner.make_cases(quick.optimizers, quick.dtypes, quick.sizes, quick.tensors)
    assert cli.kernels_of(quick, cases, cli.loop_cases_of(quick)) == [("Adam", "float32", None),
                                                                      ("Adam", "float64", None)]
    given = cli.parse_args(["--optimizers", "SGD,AdamW", "--dtypes", "float16,float64", "--nets", "book"])
    cases = runner.make_cases(given.optimizers, given.dtypes, given.sizes, given.tensors)
    assert set(cli.kernels_of(given, cases, cli.loop_cases_of(given))) == {
        ("SGD", "float16", None), ("SGD", "float64", None), ("AdamW", "float16", None), ("AdamW", "float64", None),
        ("AdamW", "float16", "bfloat16"),  # bfloat16 state: Adam and AdamW, not of float64 params
        ("AdamW", "float16", "8bit"), ("AdamW", "float64", "8bit")}  # 8-bit: its optimizers but SGD without momentum
    reference = cli.parse_args(["--impls", "xopt-reference,seed"])
    assert cli.kernels_of(reference, cases, cli.loop_cases_of(reference)) == []


def test_every_implementation_of_a_case_gets_the_same_inputs(monkeypatch):
    """Each implementation's params and grads are drawn from a generator of the same seed (one shared generator
    gave each its own draws)."""
    from xopt.bench import runner

    seen, real = [], runner.make_step

    def spy(impl, case, xp, rng):
        seen.append(rng.bit_generator.state["state"]["state"])
        return real(impl, case, xp, rng)

    monkeypatch.setattr(runner, "make_step", spy)
    case = runner.make_cases(["Adam"], ["float32"], [256], [])[0]
    runner.measure_case_samples(case, ["xopt", "seed"], np, repeat=1, warmup_rounds=(0, 0), warmup_seconds=0.0)
    assert len(seen) == 2 and seen[0] == seen[1]
