"""The version is written once (``src/robustlab/_version.py``) and every place that shows it
agrees: ``robustlab.__version__``, ``robustlab --version``, the provenance of results and
checkpoints, the build's metadata, the installed distribution and the changelog. The built
wheel's metadata is checked by ``tests/test_release.py`` (slow)."""

from __future__ import annotations

import json
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.version import Version

import robustlab as rl
from robustlab import _version
from robustlab._provenance import package_version, versions
from robustlab.cli import main

ROOT = Path(__file__).resolve().parent.parent
VERSION = _version.__version__


def test_the_version_is_a_pep_440_release():
    assert str(Version(VERSION)) == VERSION, f"{VERSION!r} is not in PEP 440's normal form"


def test_the_package_and_its_provenance_show_the_one_version():
    assert rl.__version__ == VERSION
    assert package_version() == VERSION
    assert versions()["robustlab"] == VERSION


def test_the_cli_prints_the_one_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"robustlab {VERSION}"


def test_a_checkpoint_records_the_one_version(tmp_path):
    path = rl.models.save(rl.models.create("lenet"), tmp_path / "m.safetensors")
    assert json.loads(path.with_suffix(".json").read_text())["robustlab_version"] == VERSION


def test_the_build_reads_the_version_from_the_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"], "pyproject.toml must not write the version too"
    assert "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "robustlab._version.__version__"}


def test_the_installed_distribution_has_the_one_version():
    installed = metadata.version("robustlab")
    assert installed == VERSION, (
        f"the installed robustlab says {installed}, the source {VERSION}: the install is stale; "
        "reinstall it with `pip install -e .` (make install does it)"
    )


def test_the_changelog_has_a_section_for_the_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\]", text, flags=re.MULTILINE)
    assert VERSION in headings, f"CHANGELOG.md has no '## [{VERSION}]' section: {headings}"
