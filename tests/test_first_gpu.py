"""tools/first_gpu.py without a GPU: the no-GPU exit, its JSON lines, its timeouts and budget, its list of parts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "first_gpu.py"


@pytest.fixture(scope="module")
def fg():
    spec = importlib.util.spec_from_file_location("first_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["first_gpu"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("first_gpu", None)


def _python(code):
    """A part's command: Python running ``code``, with the script's module importable as first_gpu."""
    return (sys.executable, "-c", f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import first_gpu\n{code}")


def _lines(out):
    return [json.loads(line) for line in (out / "first-gpu.jsonl").read_text().splitlines()]


def test_without_a_gpu_one_line_says_so_and_it_exits_0(tmp_path):
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - t0 < 60
    (line,) = _lines(tmp_path)
    assert line["part"] == "environment" and line["ok"] is False and line["no_gpu"] is True
    assert line["error"].startswith("no GPU found: ")


def test_json_lines_are_on_disk_one_by_one(fg, tmp_path):
    lines = fg.JsonLines(tmp_path / "x.jsonl")
    lines.write({"part": "a", "ok": True, "value": float("nan"), "path": tmp_path})
    assert len((tmp_path / "x.jsonl").read_text().splitlines()) == 1
    lines.write({"part": "b", "ok": False, "error": "why"})
    first, second = lines.read()
    assert first["part"] == "a" and np.isnan(first["value"]) and first["path"] == str(tmp_path)
    assert second == {"part": "b", "ok": False, "error": "why"}


def test_a_part_past_its_timeout_is_recorded_and_the_next_still_runs(fg, tmp_path):
    parts = [fg.Part("sleeper", _python("import time; time.sleep(60)"), 1.0),
             fg.Part("quick", _python("first_gpu.emit(value=1)"), 20.0)]
    t0 = time.monotonic()
    summary = fg.run_parts(parts, tmp_path, budget_s=60, echo=lambda *a: None)
    assert time.monotonic() - t0 < 20
    sleeper, child_line, quick, last = _lines(tmp_path)
    assert sleeper["part"] == "sleeper" and sleeper["end"] and sleeper["timed_out"] and not sleeper["ok"]
    assert "timed out after 1 s" in sleeper["error"]
    assert child_line == {"part": "quick", "ok": True, "value": 1}
    assert quick["part"] == "quick" and quick["end"] and quick["ok"]
    assert last == summary and summary["parts"] == {"sleeper": "timed out", "quick": "ok"} and not summary["ok"]


def test_the_budget_caps_a_part_and_the_rest_are_named_not_started(fg, tmp_path):
    parts = [fg.Part("long", _python("import time; time.sleep(60)"), 30.0),
             fg.Part("next", _python("pass"), 30.0), fg.Part("last", _python("pass"), 30.0)]
    t0 = time.monotonic()
    summary = fg.run_parts(parts, tmp_path, budget_s=1.5, min_start_s=1.0, echo=lambda *a: None)
    assert time.monotonic() - t0 < 15
    long, budget, _ = _lines(tmp_path)
    assert long["timed_out"] and budget["part"] == "budget" and budget["skipped"] == ["next", "last"]
    assert not budget["ok"] and "budget" in budget["error"]
    assert summary["parts"] == {"long": "timed out", "next": "not started", "last": "not started"}


def test_failed_checks_a_crash_and_an_exception_each_end_their_part(fg, tmp_path):
    parts = [fg.Part("checks", _python("first_gpu.emit(ok=False, error='differs'); sys.exit(first_gpu.CHECK_FAILED)"),
                     20.0),
             fg.Part("crash", _python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"), 20.0),
             fg.Part("raises", _python("raise ValueError('broken')"), 20.0)]
    summary = fg.run_parts(parts, tmp_path, budget_s=60, echo=lambda *a: None)
    ends = {r["part"]: r for r in _lines(tmp_path) if r.get("end")}
    assert "checks failed" in ends["checks"]["error"]
    assert ends["crash"]["error"] == "killed by SIGKILL"
    assert ends["raises"]["error"] == "exit code 1" and "ValueError: broken" in ends["raises"]["output_tail"]
    assert set(summary["parts"].values()) == {"failed"}
    assert "ValueError: broken" in (tmp_path / "first-gpu.log").read_text()


def test_no_gpu_stops_the_run_with_one_line(fg, tmp_path):
    parts = [fg.Part("environment", _python("print('nothing here'); sys.exit(first_gpu.NO_GPU)"), 20.0),
             fg.Part("after", _python("first_gpu.emit(ran=True)"), 20.0)]
    line = fg.run_parts(parts, tmp_path, budget_s=60, echo=lambda *a: None)
    assert _lines(tmp_path) == [line]
    assert line["no_gpu"] and line["error"] == "no GPU found: nothing here" and "end" not in line


def test_the_parts_cover_every_rule_and_run_in_order(fg):
    from xopt.engines import cuda_check
    from xopt.engines.kernels import CUDA_RULES

    parts = fg.plan()
    names = [p.name for p in parts]
    rules = list(CUDA_RULES)
    assert list(fg.RULES) == rules == sorted(cuda_check.CONFIGS)
    assert names[0] == "environment" and names[-1] == "tests" and names[-5:-1] == ["host", "torch-cuda", "profile", "rules"]
    from xopt.engines.cuda_blockwise import RULES8

    assert list(fg.RULES8) == list(RULES8)
    assert names[1:1 + 2 * len(rules) + len(RULES8)] == ([f"smoke:rule={r}" for r in rules]
                                                         + [f"smoke8:rule={r}" for r in RULES8]
                                                         + [f"self-check:rule={r}" for r in rules])
    assert [n for n in names if n.startswith("timing:")] == [
        f"timing:case={c}:dtype={d}" + (f":state={s}" if s else "") for c, d, s in fg.TIMING]
    assert {s for *_, s in fg.TIMING} == {None, "8bit", "bfloat16"}  # Adam's state dtypes, timed on the GPU too
    assert len(set(names)) == len(names)
    for part in parts:  # each runs a function of the script
        func = part.argv[part.argv.index("--child") + 1]
        assert callable(getattr(fg, func)) and part.timeout_s > 0
    assert [p.name for p in fg.select(parts, "timing,host")] == ["environment"] + [
        n for n in names if n.startswith(("timing", "host"))]


def test_timing_cases_have_the_sizes_they_name(fg):
    rng = np.random.default_rng(0)
    assert fg.case_sizes("1x2^28", rng) == [2**28]
    mid, small = fg.case_sizes("1000x4k-1M", rng), fg.case_sizes("10000x64-4096", rng)
    assert len(mid) == 1000 and 4096 <= min(mid) and max(mid) <= 2**20
    assert len(small) == 10_000 and 64 <= min(small) and max(small) <= 4096
    for case, *_ in fg.TIMING:
        assert fg.case_sizes(case, rng)


def test_compare_is_bit_for_bit_with_nans_equal(fg):
    a = np.array([1.0, np.nan, -0.0], dtype=np.float32)
    assert fg._compare(a, a.copy(), "float32") == (True, True, 0.0)
    same, close, diff = fg._compare(a, np.array([1.0, np.nan, 0.0], dtype=np.float32), "float32")
    assert not same and close and diff == 0.0  # -0.0 and 0.0: other bits, no difference
    same, close, diff = fg._compare(a, np.array([1.001, np.nan, -0.0], dtype=np.float32), "float32")
    assert not same and not close and diff == pytest.approx(1e-3, rel=1e-3)


def test_every_param_dtype_of_the_kernel_has_a_tolerance_and_compares(fg):
    """The smoke part steps every dtype the CUDA kernel takes (bfloat16 included): each needs its tolerance, and
    its arrays must compare (a KeyError would fail every configuration of that dtype on the GPU)."""
    from xopt import _backend
    from xopt.engines import fused_cuda

    assert set(fused_cuda.PTYPES) <= set(fg.TOL)
    for name in fused_cuda.PTYPES:
        dtype = _backend.low_precision_dtype(np, name) if name == "bfloat16" else np.dtype(name)
        a = np.array([1.0, np.nan, 2.5], dtype=dtype)
        assert fg._compare(a, a.copy(), name) == (True, True, 0.0)
        assert fg._compare(a, np.array([1.0, np.nan, 2.75], dtype=dtype), name)[0] is False


def test_the_rules_timings_run_on_numpy_beside_torch(fg):
    """The rules part's function on NumPy arrays and CPU torch (what it runs on CuPy and CUDA): a line per rule,
    torch's time beside Muon's and Adafactor's, the Newton-Schulz chain stacked and one at a time."""
    torch = pytest.importorskip("torch")
    rows = fg.rule_timings(np, lambda: None, torch, "cpu", shapes=[(32, 32)] * 3 + [(32, 48), (8,)], warmup=1,
                           repeat=1)
    by = {r["rule"]: r for r in rows}
    assert list(by) == ["Muon", "Adafactor", "LAMB", "ScheduleFreeAdamW", "Muon Newton-Schulz"]
    assert all(by[r]["xopt_ms"] > 0 for r in ("Muon", "Adafactor", "LAMB", "ScheduleFreeAdamW"))
    assert by["Muon"]["torch_ms"] > 0 and by["Adafactor"]["torch_ms"] > 0 and "torch_ms" not in by["LAMB"]
    chain = by["Muon Newton-Schulz"]
    assert chain["matrices"] == 3 and chain["shape"] == [32, 32] and chain["stacked_TFLOPs"] > 0
