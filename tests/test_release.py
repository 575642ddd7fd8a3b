"""The release test (slow; ``make test-release``): the package as a user gets it.

It builds the sdist and, from the sdist, the wheel with ``python -m build``; checks both with
``twine check --strict``; checks that the sdist holds the sources, recipes, tests and notes and
that the wheel holds every module and ``py.typed``; then installs the wheel into a fresh venv
that holds torch alone (torch 2.13.0 first, pinned, so pip never resolves another torch), the
wheel's own metadata bringing every other dependency, and from a folder outside the checkout
imports every module and runs ``robustlab --version``, ``--help``, ``list``, a 20-point
evaluation of a checkpoint the installed package saves, and a report. A package file or a
dependency the wheel forgets fails it. It needs the package index (PyPI or the local mirror)
and takes a few minutes, most of it installing torch.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest

from robustlab._version import __version__ as VERSION

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "src" / "robustlab"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
TORCH = "torch==2.13.0"  # the local CPU wheel of the Makefile
# imported only when asked for, with an install hint (robustlab/_progress.py)
OPTIONAL_IMPORTS = {"tensorboard"}


def _run(args: list[str | Path], cwd: Path | None = None, env: dict[str, str] | None = None):
    """Run ``args``; a non-zero exit fails the test with the command and its output."""
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, (
        f"{' '.join(map(str, args))} exited {done.returncode}\n"
        f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
    )
    return done


def _package_files() -> set[str]:
    """The files of ``src/robustlab`` relative to ``src`` (caches left out)."""
    return {
        p.relative_to(ROOT / "src").as_posix()
        for p in PKG.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def _declared_dependencies() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_dist_name(req) for req in project["dependencies"]}


def _dist_name(requirement: str) -> str:
    name = requirement.split(";")[0]
    for stop in "<>=!~[ (":
        name = name.split(stop)[0]
    return name.strip().lower().replace("_", "-")


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """The sdist and the wheel built from it, in a folder of their own. The source is a copy of
    the checkout's files that git tracks or would track, so nothing is built in the checkout."""
    tmp = tmp_path_factory.mktemp("release")
    source, out = tmp / "source", tmp / "dist"
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], ROOT)
    for rel in filter(None, listed.stdout.split("\0")):
        if (ROOT / rel).is_file():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, source / rel)
    _run([sys.executable, "-m", "build", "--outdir", out, source])  # the wheel from the sdist
    return out


def _only(folder: Path, pattern: str) -> Path:
    (found,) = folder.glob(pattern)
    return found


def test_twine_accepts_the_sdist_and_the_wheel(dist):
    _run([sys.executable, "-m", "twine", "check", "--strict", *sorted(dist.iterdir())])


def test_the_sdist_holds_sources_recipes_tests_and_notes(dist):
    with tarfile.open(_only(dist, f"robustlab-{VERSION}.tar.gz")) as tar:
        prefix = f"robustlab-{VERSION}/"
        names = {m.name.removeprefix(prefix) for m in tar.getmembers() if m.isfile()}
    wanted = {"src/" + f for f in _package_files()}
    wanted |= {"tests/conftest.py", "tests/helpers.py", "tests/test_release.py"}
    wanted |= {"README.md", "CHANGELOG.md", "LICENSE", "pyproject.toml", "src/robustlab/py.typed"}
    missing = sorted(wanted - names)
    assert not missing, f"the sdist lacks {missing} (MANIFEST.in says what it ships)"


def test_the_wheel_holds_every_module_py_typed_and_the_version(dist):
    with zipfile.ZipFile(_only(dist, f"robustlab-{VERSION}-py3-none-any.whl")) as whl:
        names = set(whl.namelist())
        meta = Parser().parsestr(whl.read(f"robustlab-{VERSION}.dist-info/METADATA").decode())
    missing = sorted(_package_files() - names)
    assert not missing, f"the wheel lacks {missing} ([tool.setuptools] in pyproject.toml)"
    assert "robustlab/py.typed" in names
    assert meta["Version"] == VERSION
    required = {_dist_name(r) for r in meta.get_all("Requires-Dist") if "extra ==" not in r}
    assert required == _declared_dependencies()


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level names the package imports (at any level) that are neither the standard library
    nor robustlab, each with the files that import it."""
    found: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top not in sys.stdlib_module_names and top != "robustlab":
                    found.setdefault(top, set()).add(path.relative_to(PKG).as_posix())
    return found


def test_every_import_is_a_declared_dependency():
    """Imports inside functions too, which importing every module does not reach."""
    declared, dists = _declared_dependencies(), metadata.packages_distributions()
    undeclared = {
        name: sorted(files)
        for name, files in _third_party_imports().items()
        if name not in OPTIONAL_IMPORTS
        and not {d.lower().replace("_", "-") for d in dists.get(name, [])} & declared
    }
    assert not undeclared, f"imported but not in [project] dependencies: {undeclared}"


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """A new venv with torch alone (and what torch itself needs)."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", venv])
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet"]
    _run([*pip, TORCH])
    frozen = _run([venv / "bin" / "python", "-m", "pip", "freeze"]).stdout.lower()
    present = {_dist_name(line) for line in frozen.splitlines() if line.strip()}
    extra = (_declared_dependencies() - {"torch"}) & present
    assert not extra, f"the fresh venv already holds {extra}: the wheel would not bring them"
    return venv


def _env(data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return env | {"ROBUSTLAB_DATA": str(data), "ROBUSTLAB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _wheel_run(venv: Path, args: list[str], cwd: Path, env: dict[str, str]) -> str:
    return _run([venv / "bin" / args[0], *args[1:]], cwd, env).stdout


def test_the_wheel_in_a_venv_with_torch_alone_runs_the_cli(dist, fresh_venv, tmp_path, fake_fmnist):
    wheel = _only(dist, "*.whl")
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(TORCH + "\n")  # whatever the wheel asks, torch stays this one
    venv, py = fresh_venv, fresh_venv / "bin" / "python"
    _run([py, "-m", "pip", "install", "--quiet", "-c", constraints, wheel])
    _run([py, "-m", "pip", "check"])
    assert TORCH in _run([py, "-m", "pip", "freeze"]).stdout.replace("+cpu", "")

    work = tmp_path / "outside"  # not the checkout: only the installed package can be imported
    work.mkdir()
    env = _env(FMNIST if (FMNIST / "t10k-images-idx3-ubyte.gz").is_file() else fake_fmnist)
    every_module = (
        "import importlib, pathlib, pkgutil, robustlab\n"
        "p = pathlib.Path(robustlab.__file__).resolve()\n"
        f"assert pathlib.Path({str(venv.resolve())!r}) in p.parents, p\n"
        "assert (p.parent / 'py.typed').is_file()\n"
        "for m in pkgutil.walk_packages(robustlab.__path__, 'robustlab.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "print(robustlab.__version__)\n"
    )
    assert _wheel_run(venv, ["python", "-c", every_module], work, env).strip() == VERSION
    assert _wheel_run(venv, ["robustlab", "--version"], work, env).strip() == f"robustlab {VERSION}"
    assert "evaluate" in _wheel_run(venv, ["robustlab", "--help"], work, env)
    listed = _wheel_run(venv, ["robustlab", "list"], work, env)
    assert all(f"{kind}:" in listed for kind in ("attacks", "defenses", "models", "objectives"))
    recipes = (
        "from robustlab.config import load_recipe, shipped_recipes\n"
        "assert 'quickstart' in shipped_recipes()\n"
        "print(load_recipe('configs/quickstart.toml').train.objective, "
        "load_recipe('trades').train.objective)\n"
    )
    assert _wheel_run(venv, ["python", "-c", recipes], work, env).split() == ["pgd-at", "trades"]

    save = (
        "import robustlab as rl\n"
        "rl.models.save(rl.models.create('lenet'), 'run/model.safetensors',"
        " meta={'dataset': 'fashion-mnist'})\n"
    )
    _wheel_run(venv, ["python", "-c", save], work, env)
    evaluate = ["robustlab", "evaluate", "run/model.safetensors", "--eps", "0.1"]
    _wheel_run(venv, [*evaluate, "--suite", "fast", "--n", "20", "--quiet"], work, env)
    (results,) = (work / "run").glob("*/results.json")
    record = json.loads(results.read_text())
    assert record["n"] == 20 and record["versions"]["robustlab"] == VERSION
    sidecar = json.loads((work / "run" / "model.json").read_text())
    assert sidecar["robustlab_version"] == VERSION
    _wheel_run(venv, ["robustlab", "report", "run", "-o", "run/report.html"], work, env)
    assert (work / "run" / "report.html").stat().st_size > 0
