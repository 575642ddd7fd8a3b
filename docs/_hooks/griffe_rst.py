"""Griffe extension for the API reference: robustlab's docstrings are Google style with
reStructuredText habits. Before mkdocstrings renders them as Markdown, this turns

- Sphinx roles (``:func:`names```, ``:class:`~robustlab.defenses.base.Defense```) into inline
  code (the last dotted part where the target starts with ``~``), and
- doctest lines (``>>> ...``, their ``...`` continuations and the output up to a blank line),
  which Markdown would read as nested block quotes, into fenced ``pycon`` blocks.

Loaded by mkdocs.yml (``plugins: mkdocstrings: handlers: python: options: extensions``);
nothing under ``src/`` is changed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:mod|class|func|meth|attr|data|exc|obj|const):`(~?)([^`]+)`")


def _role(match: re.Match[str]) -> str:
    target = match.group(2)
    if match.group(1):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


_EXAMPLES = re.compile(r"^(\s*)Examples?:\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _fence_doctests(text: str) -> str:
    """Fences doctests outside ``Example:`` sections (griffe renders those itself)."""
    out: list[str] = []
    lines = text.split("\n")
    section = None  # the indent of an open Example(s): header
    i = 0
    while i < len(lines):
        line = lines[i]
        if section is not None and line.strip() and _indent(line) <= section:
            section = None
        header = _EXAMPLES.match(line)
        if header:
            section = len(header.group(1))
        if section is not None or not line.lstrip().startswith(">>>"):
            out.append(line)
            i += 1
            continue
        indent = line[: _indent(line)]
        if out and out[-1].strip():
            out.append("")
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(f"{indent}```")
    return "\n".join(out)


def rewrite(text: str) -> str:
    """The docstring ``text`` with roles as inline code and doctests fenced (see above)."""
    return _fence_doctests(_ROLE.sub(_role, text))


class RstHabits(griffe.Extension):
    """Rewrites every docstring once, when griffe creates its object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
