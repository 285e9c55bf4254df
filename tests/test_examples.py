"""The examples run from the command line's entry point with small settings, and say what they promise."""

import pathlib
import runpy

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _main(name):
    return runpy.run_path(str(EXAMPLES / name))["main"]


def test_optimizer_paths(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "paths.png"
    _main("optimizer_paths.py")(["--steps", "30", "--out", str(out)])
    text = capsys.readouterr().out
    assert out.read_bytes()[:4] == b"\x89PNG"
    for name in ("SGD", "Momentum", "Nesterov", "AdaGrad", "RMSprop", "Adam", "AdamW", "AdaDelta", "Adamax", "NAdam",
                 "RAdam", "Lion"):
        line = next(line for line in text.splitlines() if line.startswith(name + " "))
        f_end = float(line.rsplit("f = ", 1)[1])
        assert f_end < 0.2 * (49 / 20 + 4), f"{name} barely moved toward the minimum: {line}"


def test_digits_mlp_small(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "digits.png"
    _main("digits_mlp.py")(["--epochs", "2", "--optimizers", "SGD,Adam", "--out", str(out)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("best test accuracy: ") and last.endswith(("(SGD)", "(Adam)"))
    assert 0.0 <= float(last.split()[3]) <= 1.0
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # the default 40 epochs; test_digits_mlp_small runs the same code for 2
def test_digits_mlp_reaches_095_with_defaults(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    _main("digits_mlp.py")(["--optimizers", "Adam", "--out", str(tmp_path / "d.png")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert float(last.split()[3]) >= 0.95, last


@pytest.mark.parametrize("name", ["Lion", "LAMB", "Adafactor", "Muon", "ScheduleFreeAdamW"])
def test_digits_mlp_trains_with_the_newer_optimizers(name, capsys):
    """Each newer optimizer's row learns the digits in 10 epochs (chance is 0.1); Schedule-Free is evaluated at
    its average x (``eval``), the params dict left there."""
    pytest.importorskip("sklearn")
    ns = runpy.run_path(str(EXAMPLES / "digits_mlp.py"))
    np = ns["np"]
    xp = ns["array_namespace"](np.empty(0))
    losses, acc = ns["train"](name, xp, None, ns["load"](xp, None), 10, 100)
    assert acc >= 0.9, (name, acc)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), name


def test_quickstart_runs(capsys):
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    assert "mean squared error after 200 steps" in capsys.readouterr().out


