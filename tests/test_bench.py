"""xopt-bench: the results JSON follows the schema, the plots are written, the roofline counts bytes right."""

import json

import pytest

from xopt.bench import cli, roofline, runner

SCHEMA_TOP = {"commit": str, "device": str, "backend": str, "date": str, "copy_GBps": float, "versions": dict,
              "rows": list}
SCHEMA_ROW = {"optimizer": str, "impl": str, "dtype": str, "numel": int, "tensors": int, "seconds": float,
              "GBps": float, "roofline_fraction": float}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("bench")
    cli.main(["--device", "cpu", "--optimizers", "Adam,SGD", "--sizes", "2^10,5000", "--tensors", "30",
              "--repeat", "2", "--out", str(out)])
    return out, json.loads((out / "results.json").read_text())


def test_results_follow_the_schema(small_run):
    _, result = small_run
    for key, kind in SCHEMA_TOP.items():
        assert isinstance(result[key], kind), key
    assert result["backend"] == "numpy" and result["copy_GBps"] > 0
    assert result["commit"] == "unknown" or len(result["commit"].split("-")[0]) == 40
    for row in result["rows"]:
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
    cases = {(r["optimizer"], r["numel"], r["tensors"]) for r in result["rows"]}
    assert {(o, t) for o, _, t in cases} == {("Adam", 1), ("SGD", 1), ("Adam", 30), ("SGD", 30)}
    for case in cases:
        got = {r["impl"] for r in result["rows"] if (r["optimizer"], r["numel"], r["tensors"]) == case}
        assert impls <= got, (case, got)
        assert ("xopt-bf16-state" in got) == (case[0] == "Adam"), (case, got)


def test_plots_are_pngs(small_run):
    out, _ = small_run
    for name in ("throughput.png", "many_tensors.png"):
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


def test_many_tensor_cases_draw_small_tensors():
    (case,) = runner.make_cases(["Adam"], ["float32"], [], [2000])
    assert case.tensors == 2000
    assert all(runner.SMALL_TENSOR_SIZES[0] <= n <= runner.SMALL_TENSOR_SIZES[1] for n in case.sizes)


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--optimizers", "Adamax"])
    assert "Adamax" in capsys.readouterr().err
