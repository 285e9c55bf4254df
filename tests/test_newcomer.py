"""What a newcomer trips on: torch's argument names, help(), error wording, names."""

import inspect
import pathlib
import pydoc

import numpy as np
import pytest

import xopt

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPTIMIZERS = [c for c in map(xopt.__dict__.get, xopt.__all__) if isinstance(c, type) and c is not xopt.Optimizer
              and issubclass(c, xopt.Optimizer)]


@pytest.mark.parametrize("cls", [xopt.Adam, xopt.AdamW])
def test_torchs_betas_is_refused_with_a_hint_naming_beta1_and_beta2(cls):
    with pytest.raises(TypeError, match=r"'betas': xopt names them .* beta1=0.9, beta2=0.999"):
        cls(betas=(0.9, 0.999))


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_help_shows_the_common_arguments_and_plain_math(cls):
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    signature = str(inspect.signature(cls))
    for name in ("impl='auto'", "skip_nonfinite=False", "clip_grad_norm=None", "overrides=None"):
        assert name in signature, name
    for name in ("impl:", "skip_nonfinite:", "clip_grad_norm:", "overrides:", "In plain text::", "W ←"):
        assert name in text, name


def test_a_state_of_another_dtype_is_named_forwards():
    opt = xopt.Adam()
    params = {"W": np.ones(3, np.float32)}
    opt.update(params, {"W": np.ones(3, np.float32)})
    opt.state["W"]["m"] = np.zeros(3)
    with pytest.raises(TypeError, match="param 'W' is float32 but its optimizer state 'm' is float64"):
        opt.update(params, {"W": np.ones(3, np.float32)})


def test_the_distribution_has_a_name_of_its_own_and_the_import_name_stays():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (requires-python is >=3.10)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] != "xopt"  # PyPI's xopt is another project
    assert "xopt" in (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.packages.find]")[1]


def test_bench_results_are_ignored_by_git():
    assert "bench-results/" in (ROOT / ".gitignore").read_text().split()
