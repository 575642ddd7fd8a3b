"""The house rules of CONTRIBUTING.md, checked on the source with ``ast`` (no import, well under
a second), plus the import-time promises of the layers (one subprocess each).

- no import circle between files (edges into a package's ``__init__`` face aside: a face
  re-exports its files);
- no function-level import of ``robustlab`` outside ``cli.py`` (the one module that loads the
  library per command);
- no file over 300 lines of code, no function over 65 (its docstring aside), no class over
  200: a line of code is one a statement starts on or a bare line of a module or class body,
  so a call the formatter spreads over ten lines counts once, and comments and blank lines not
  at all (the limits bind as tightly as 450, 80 and 250 physical lines did before the code was
  run through ``ruff format``);
- no inline integer/number check (``isinstance(v, bool) or not isinstance(v, ...)``) outside
  ``_validate.py``: use its vocabulary;
- no arrow that the architecture forbids (``NEVER`` below, the ``never`` list of the project's
  architecture picture), with files mapped to parts by path (``PARTS``).
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PKG = SRC / "robustlab"
MAX_FILE, MAX_FUNCTION, MAX_CLASS = 300, 65, 200
INLINE_CHECK = re.compile(r"isinstance\(\w+, bool\)\s+or\s+not\s+isinstance\(")

# the parts of the architecture: a file belongs to the first part with a prefix of its path
PARTS = {
    "Ground": (
        "threat.py",
        "_eps.py",
        "noise.py",
        "registry.py",
        "_validate.py",
        "_modes.py",
        "_io.py",
        "_provenance.py",
    ),
    "Data": ("data/",),
    "Models": ("models/",),
    "Attacks": ("attacks/",),
    "Training": ("training/",),
    "Defenses": ("defenses/",),
    "Evaluation": ("evaluation/",),
    "Report": ("report/",),
    "CLI": ("cli.py", "cli_args.py", "cli_out.py", "__main__.py"),
}
# (from, to, why): the arrows that must never exist
NEVER = [
    ("Ground", "Attacks", "geometry knows no attack"),
    ("Ground", "Models", "geometry knows no model"),
    ("Attacks", "Training", "attacks know no trainer"),
    ("Attacks", "Evaluation", "attacks know no suite"),
    ("Attacks", "Defenses", "attacks see a smoothed model through a protocol, not a class"),
    ("Models", "Attacks", "a model knows no attack"),
    ("Models", "Training", "a model knows no trainer"),
    ("Models", "Defenses", "layers live in models"),
    ("Data", "Models", "data knows no model"),
    ("Training", "Defenses", "noise lives on the ground floor"),
    ("Defenses", "Training", "a defense trains nothing; the denoiser's trainer lives in training"),
    ("Evaluation", "Training", "evaluating trains nothing"),
    ("Report", "Attacks", "reports render results, never compute them"),
    ("Report", "Defenses", "reports render results"),
    ("Report", "Models", "reports render results"),
    ("Report", "Training", "reports render results"),
    ("Training", "CLI", "library never imports the face"),
    ("Evaluation", "CLI", "library never imports the face"),
    ("Attacks", "CLI", "library never imports the face"),
    ("Defenses", "CLI", "library never imports the face"),
    ("Report", "CLI", "library never imports the face"),
]


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {_module(p): p for p in sorted(PKG.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in FILES.items()}
FACES = {name for name, path in FILES.items() if path.name == "__init__.py"}


def _rel(name: str) -> str:
    return FILES[name].relative_to(PKG).as_posix()


def _imported(name: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The package's modules that ``node`` (in module ``name``) imports."""
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = name.split(".")
            if FILES[name].name != "__init__.py":
                anchor = anchor[:-1]
            anchor = anchor[: len(anchor) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        targets = [base] + [f"{base}.{a.name}" for a in node.names]
    return {t for t in targets if t in FILES and t != name}


def _imports(name: str) -> set[str]:
    return {
        m
        for node in ast.walk(TREES[name])
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for m in _imported(name, node)
    }


def _part(name: str) -> str | None:
    rel = _rel(name)
    return next(
        (
            part
            for part, prefixes in PARTS.items()
            if any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in prefixes)
        ),
        None,
    )


def _circles() -> list[list[str]]:
    """Strongly connected components of more than one file (Tarjan), package faces left out."""
    graph = {m: _imports(m) - FACES for m in FILES if m not in FACES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_between_files():
    circles = _circles()
    assert not circles, "\n".join(" <-> ".join(c) for c in circles)


def test_no_function_level_import_of_the_package_outside_the_cli():
    lazy = []
    for name, tree in TREES.items():
        if _rel(name) == "cli.py":
            continue
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy += [
                    f"{_rel(name)}:{node.lineno}"
                    for node in ast.walk(fn)
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and _imported(name, node)
                ]
    assert not lazy, "\n".join(sorted(set(lazy)))


def _code_lines(source: str) -> set[int]:
    """The lines a token starts on outside brackets, comments aside: one per statement line
    however the formatter wraps its brackets."""
    lines: set[int] = set()
    depth = 0
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in skip or tok.type == tokenize.ENDMARKER:
            continue
        if depth == 0:
            lines.add(tok.start[0])
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
    return lines


def _body_start(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> int:
    """The first line of ``node`` that counts: a function's docstring aside."""
    first = node.body[0]
    if (
        not isinstance(node, ast.ClassDef)
        and isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        return (first.end_lineno or first.lineno) + 1
    return node.lineno


def test_sizes_of_files_functions_and_classes():
    big = []
    for name, tree in TREES.items():
        rel = _rel(name)
        code = _code_lines(FILES[name].read_text())
        if len(code) > MAX_FILE:
            big.append(f"{rel} ({len(code)} lines of code)")
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            end = node.end_lineno or node.lineno
            size = sum(_body_start(node) <= line <= end for line in code)
            if isinstance(node, ast.ClassDef) and size > MAX_CLASS:
                big.append(f"{rel}:{node.name} (class, {size} lines of code)")
            elif not isinstance(node, ast.ClassDef) and size > MAX_FUNCTION:
                big.append(f"{rel}:{node.name} ({size} lines of code besides its docstring)")
    assert not big, "\n".join(big)


def test_no_inline_number_checks_outside_validate():
    inline = [
        f"{_rel(name)}:{FILES[name].read_text()[: m.start()].count(chr(10)) + 1}"
        for name in FILES
        if _rel(name) != "_validate.py"
        for m in INLINE_CHECK.finditer(FILES[name].read_text())
    ]
    assert not inline, "\n".join(inline)


def test_no_forbidden_arrow():
    never = {(a, b): why for a, b, why in NEVER}
    arrows = []
    for name in FILES:
        for target in _imports(name):
            arrow = (_part(name), _part(target))
            if arrow in never:
                arrows.append(f"{_rel(name)} -> {_rel(target)}: {never[arrow]}")
    assert not arrows, "\n".join(sorted(arrows))


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("robustlab.attacks", ("robustlab.training", "robustlab.defenses", "robustlab.evaluation")),
        ("robustlab.models", ("robustlab.attacks", "robustlab.training", "robustlab.defenses")),
        (
            "robustlab.report",
            ("robustlab.attacks", "robustlab.defenses", "robustlab.models", "robustlab.training"),
        ),
    ],
)
def test_importing_a_layer_loads_nothing_above_it(module, forbidden):
    code = (
        f"import sys, {module}; print(' '.join(sorted(m for m in sys.modules "
        f"if m.startswith({forbidden!r}))))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=SRC
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [], f"import {module} loads {run.stdout}"
