"""MkDocs hooks: the performance tables and plots, generated from benchmarks/results/ at build time.

A line ``<!-- perf: NAME -->`` in a page becomes table NAME of ``tools/perf_docs.py`` (an unknown name fails
the build), and the full CPU run's plots are drawn from its JSON into ``performance/`` of the site.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from mkdocs.structure.files import File

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf_docs  # noqa: E402

_MARKER = re.compile(r"^<!-- perf: (\w+) -->$", re.M)
_TMP = tempfile.TemporaryDirectory(prefix="xopt-docs-plots-")


def on_files(files, config):
    for path in perf_docs.plots(_TMP.name):
        files.append(File.generated(config, f"performance/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    def table(match):
        name = match.group(1)
        if name not in perf_docs.TABLES:
            raise ValueError(f"{page.file.src_uri}: no performance table named {name!r} in tools/perf_docs.py")
        return perf_docs.TABLES[name]()

    return _MARKER.sub(table, markdown)


def _public_names():
    """The ``__all__`` of xopt, xopt.schedules, xopt.torch and xopt.optax, read from the sources (as mkdocstrings
    reads them)."""
    import ast

    names = []
    for module, prefix in (("xopt/__init__.py", "xopt."), ("xopt/schedules.py", "xopt.schedules."),
                           ("xopt/torch.py", "xopt.torch."), ("xopt/optax.py", "xopt.optax.")):
        tree = ast.parse((perf_docs.ROOT / module).read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                names += [prefix + value for value in ast.literal_eval(node.value)]
    return names


def on_post_build(config):
    """Fail the build if a public name has no entry (an anchor made by mkdocstrings) anywhere in the site."""
    site = Path(config["site_dir"])
    text = "".join(path.read_text(encoding="utf-8") for path in site.rglob("*.html"))
    missing = [name for name in _public_names() if f'id="{name}"' not in text]
    if missing:
        raise ValueError(f"public names with no entry in the docs (add them to docs/api.md or "
                         f"docs/optimizers.md): {', '.join(missing)}")
