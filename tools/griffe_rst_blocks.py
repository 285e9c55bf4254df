"""A griffe extension for the docs: the docstrings' reST literal and math blocks as Markdown.

The optimizers' docstrings carry their rule twice, as ``help()`` shows it: a literal block
("In plain text::") and a ``.. math::`` block.  For the site the first becomes a fenced code block
and the second a display-math block rendered by MathJax (pymdownx.arithmatex).  The base class's
"Args common to every optimizer (keyword only):" becomes a Google "Keyword Args:" section, so its
arguments are rendered as a table, and Sphinx roles (:class:`X`) become code.
"""

from __future__ import annotations

import re
import textwrap

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc):`~?([^`]+)`")
_COMMON_ARGS = re.compile(r"^([ ]*)Args common to every optimizer \(keyword only\):$", re.M)
_BLOCK = re.compile(r"^(?P<indent>[ ]*)(?P<head>.*?)(?P<kind>::|\.\. math::)[ ]*\n(?P<body>(?:(?P=indent)[ ]+.*\n|[ ]*\n)+)",
                    re.M)


def _convert(text: str) -> str:
    def block(match):
        indent, head, kind = match.group("indent"), match.group("head"), match.group("kind")
        body = textwrap.dedent(match.group("body")).strip("\n")
        if kind == ".. math::":
            inner = textwrap.indent("\\begin{aligned}\n" + body + "\n\\end{aligned}", indent)
            return f"{indent}{head}\n{indent}$$\n{inner}\n{indent}$$\n\n"
        lead = f"{indent}{head}:\n\n" if head.strip() else ""
        return f"{lead}{indent}```text\n{textwrap.indent(body, indent)}\n{indent}```\n\n"

    text = _COMMON_ARGS.sub(r"\1Keyword Args:", _ROLE.sub(r"`\1`", text))
    return _BLOCK.sub(block, text + "\n").rstrip("\n")


class RstBlocks(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _convert(obj.docstring.value)
