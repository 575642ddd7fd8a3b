"""The command line in a new user's first hour (issue 16): nothing overwritten, file-system
problems in one line before anything loads, a help that helps, bad arguments refused fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import robustlab as rl
from robustlab._provenance import package_version
from robustlab.cli import main
from robustlab.cli_args import build_parser
from robustlab.cli_out import default_folder

SRC = Path(__file__).resolve().parent.parent / "src"


@pytest.fixture
def env(monkeypatch, fake_fmnist):
    monkeypatch.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
    monkeypatch.setenv("ROBUSTLAB_OFFLINE", "1")


@pytest.fixture
def ckpt(tmp_path):
    """An untrained LeNet for Fashion-MNIST, saved as a checkpoint in its own folder."""
    model = rl.models.create("lenet", num_classes=10, in_channels=1, input_size=28)
    path = tmp_path / "run" / "model.safetensors"
    path.parent.mkdir()
    rl.models.save(model, path, meta={"dataset": "fashion-mnist"})
    return path


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: the command must stop before it."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(rl.models, "load", load)


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and ".tmp" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# --- item 1: results never overwrite results ---------------------------------------------------
FGSM = ["--attack", "fgsm", "--n", "16", "--quiet"]


def test_two_evaluations_with_different_eps_are_both_kept(ckpt, env, capsys):
    assert main(["evaluate", str(ckpt), "--eps", "0.05", *FGSM]) == 0
    assert main(["evaluate", str(ckpt), "--eps", "0.2", *FGSM]) == 0
    found = sorted(ckpt.parent.glob("*/results.json"))
    assert len(found) == 2, found
    assert sorted(json.loads(p.read_text())["threat"]["eps"] for p in found) == [0.05, 0.2]
    assert not (ckpt.parent / "results.json").exists()
    assert main(["report", str(ckpt.parent)]) == 0  # the report finds both
    page = (ckpt.parent / "report.html").read_text()
    assert all(p.parent.name in page for p in found)


def test_a_finished_evaluation_is_kept_unless_overwrite(ckpt, env, capsys):
    args = ["evaluate", str(ckpt), "--eps", "0.1", *FGSM]
    assert main(args) == 0
    (path,) = ckpt.parent.glob("*/results.json")
    before = path.read_text()
    capsys.readouterr()
    assert main(args) == 0  # the same settings: nothing to do, the result stays
    out = capsys.readouterr()
    assert "--overwrite" in out.out + out.err and path.read_text() == before
    other = ckpt.parent / "mine"
    assert main(["evaluate", str(ckpt), "--eps", "0.2", *FGSM, "--out", str(other)]) == 0
    mine = (other / "results.json").read_text()
    assert main(["evaluate", str(ckpt), "--eps", "0.3", *FGSM, "--out", str(other)]) == 2
    _one_line_error(capsys, str(other), "--overwrite")
    assert (other / "results.json").read_text() == mine
    assert (
        main(["evaluate", str(ckpt), "--eps", "0.3", *FGSM, "--out", str(other), "--overwrite"])
        == 0
    )
    assert json.loads((other / "results.json").read_text())["threat"]["eps"] == 0.3


@pytest.mark.parametrize(
    "command, required, result",
    [
        ("audit", ["--eps", "0.1"], "results.json"),
        ("certify", ["--sigma", "0.25"], "certify.json"),
        ("smooth", ["--sigmas", "0.25", "--samples", "4"], "smoothing.json"),
    ],
)
def test_every_command_refuses_to_replace_a_finished_result(
    command, required, result, ckpt, no_loading, capsys, tmp_path
):
    out = tmp_path / "elsewhere"
    out.mkdir()
    (out / result).write_text(json.dumps({"config": {"checkpoint": "another"}}))
    assert main([command, str(ckpt), *required, "--out", str(out)]) == 2
    _one_line_error(capsys, str(out), "--overwrite")
    assert json.loads((out / result).read_text()) == {"config": {"checkpoint": "another"}}


def test_default_folders_are_named_from_the_settings():
    def folder(*argv: str) -> str:
        return default_folder(build_parser().parse_args(list(argv))).name

    base = ("evaluate", "run/model.safetensors", "--eps", "0.1")
    assert folder(*base) == "eval-linf-0.1-standard-n1000-seed0"
    assert folder(*base, "--eps", "0.2") != folder(*base)
    assert folder(*base, "--suite", "fast") != folder(*base)
    assert folder(*base, "--seed", "1") != folder(*base)
    assert folder(*base, "--attack", "pgd", "--steps", "5") != folder(*base, "--attack", "pgd")
    assert folder(*base, "--quiet", "--device", "cpu") == folder(*base)
    assert folder("audit", "m.safetensors", "--eps", "0.1").startswith("audit-linf-0.1")
    certify = folder("certify", "m.safetensors", "--sigma", "0.25")
    assert certify == "certify-gaussian-0.25-n100000-seed0"  # more --n-points: the same folder
    assert folder("smooth", "m.safetensors", "--sigmas", "0.1", "--samples", "4") != folder(
        "smooth", "m.safetensors", "--sigmas", "0.2", "--samples", "4"
    )


# --- item 7: file-system problems in one line, before anything loads ---------------------------
def test_out_is_a_file(ckpt, no_loading, capsys, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    assert main(["evaluate", str(ckpt), "--eps", "0.1", "--out", str(f)]) == 2
    _one_line_error(capsys, str(f), "is a file")
    assert main(["evaluate", str(ckpt), "--eps", "0.1", "--out", str(f / "sub")]) == 2
    _one_line_error(capsys, str(f), "is a file")


def test_output_file_is_a_folder(capsys, tmp_path):
    assert main(["report", str(tmp_path), "-o", str(tmp_path)]) == 2
    _one_line_error(capsys, str(tmp_path), "is a folder")
    assert main(["compare", str(tmp_path), "-o", str(tmp_path)]) == 2
    _one_line_error(capsys, str(tmp_path), "is a folder")


def test_inputs_that_are_folders(no_loading, capsys, tmp_path):
    assert main(["evaluate", str(tmp_path), "--eps", "0.1"]) == 2
    _one_line_error(capsys, str(tmp_path), "is a folder")
    assert main(["train", "--config", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, str(tmp_path), "is a folder")


@pytest.mark.parametrize("where", ["/proc/robustlab-out", "/proc/self/robustlab-out"])
def test_out_under_proc(where, ckpt, no_loading, capsys):
    assert main(["evaluate", str(ckpt), "--eps", "0.1", "--out", where]) == 2
    _one_line_error(capsys, where)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_out_unwritable(ckpt, no_loading, capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["evaluate", str(ckpt), "--eps", "0.1", "--out", str(locked / "o")]) == 2
    _one_line_error(capsys, str(locked), "not writable")


def test_out_on_a_read_only_file_system(ckpt, no_loading, capsys, tmp_path, monkeypatch):
    import robustlab.cli_out as cli_out

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(tmp_path / "tmpabc123"))

    monkeypatch.setattr(cli_out.tempfile, "TemporaryFile", read_only)
    assert main(["evaluate", str(ckpt), "--eps", "0.1", "--out", str(tmp_path / "o")]) == 2
    err = _one_line_error(capsys, str(tmp_path / "o"), "not writable", "Read-only file system")
    assert "tmpabc123" not in err


def test_write_error_during_a_run_is_one_line(ckpt, env, capsys, monkeypatch):
    import robustlab.cli as cli

    def fail(args):
        raise PermissionError(13, "Permission denied", str(ckpt.parent / ".results.json.x1.tmp"))

    monkeypatch.setitem(cli.COMMANDS, "evaluate", fail)
    assert main(["evaluate", str(ckpt), "--eps", "0.1"]) == 2
    _one_line_error(capsys, str(ckpt.parent), "Permission denied")


# --- item 4, the CLI half: an eps that covers the whole box -------------------------------------
def test_eps_covering_the_box_asks_for_8_255(ckpt, no_loading, capsys):
    assert main(["evaluate", str(ckpt), "--eps", "8"]) == 2
    _one_line_error(
        capsys,
        "eps 8 covers the whole input box [0, 1]",
        "did you mean 8/255 (= 0.0314)?",
        "--force-eps",
    )
    assert main(["audit", str(ckpt), "--eps", "1"]) == 2
    _one_line_error(capsys, "covers the whole input box")
    with pytest.raises(AssertionError, match="a model was loaded"):  # forced: it runs
        main(["evaluate", str(ckpt), "--eps", "8", "--force-eps"])


def test_l2_eps_covering_the_box(ckpt, env, capsys):
    assert main(["evaluate", str(ckpt), "--norm", "l2", "--eps", "30", *FGSM]) == 2
    _one_line_error(capsys, "covers the whole input box", "--force-eps")


# --- item 10: first contact -----------------------------------------------------------------
def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "`" not in text
    for command in (
        "train",
        "evaluate",
        "audit",
        "certify",
        "smooth",
        "denoise",
        "report",
        "compare",
        "list",
    ):
        assert f"\n    {command} " in text or f"\n  {command} " in text, command
    assert "robustlab train --config configs/quickstart.toml" in text  # a first hour, in order
    assert "robustlab evaluate" in text and "--version" in text


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and package_version() in capsys.readouterr().out


def test_every_option_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = [
        f"{name} {'/'.join(a.option_strings) or a.dest}"
        for name, p in sub.choices.items()
        for a in p._actions
        if not a.help and a.dest != "help"
    ]
    assert not missing, missing


def test_list_suites_says_what_each_runs_and_costs(capsys):
    assert main(["list", "suites"]) == 0
    lines = capsys.readouterr().out.splitlines()
    text = "\n".join(lines)
    for name in rl.evaluation.suites():
        (line,) = [ln for ln in lines if ln.lstrip().startswith(f"{name}:")]
        assert "cost" in line, line
    assert "apgd-ce" in text and "fab-t" in text and "square" in text
    assert main(["list", "attacks"]) == 0
    assert capsys.readouterr().out.startswith("attacks: ")


def test_a_bad_argument_is_refused_before_torch_loads(tmp_path):
    code = (
        "import sys, robustlab.cli as c\n"
        "try:\n    c.main(['evaluate', '--eps', 'nope', 'x.safetensors'])\n"
        "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert run.stdout.split() == ["exit", "2", "False"], run.stdout + run.stderr
    assert "cannot parse eps 'nope'" in run.stderr


def test_help_and_version_load_no_torch(tmp_path):
    code = (
        "import sys, robustlab.cli as c\n"
        "for argv in (['--version'], ['--help'], ['evaluate', '--help']):\n"
        "    try:\n        c.main(argv)\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules, file=sys.stderr)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert run.stderr.strip() == "False", run.stderr


def test_readme_names_the_certification_writer():
    readme = (SRC.parent / "README.md").read_text()
    assert "robustlab.evaluation.certification.run_certification" in readme
