"""The command line on the user's own model and data (issue 18, items 1-4): ``--model SPEC``
with weights converted from a DataParallel ``.pt`` by ``robustlab convert-weights``, ``--data``
as a folder of PNGs or an ``.npz``, and every bad input as one line before any attack runs."""

from __future__ import annotations

import copy
import hashlib
import json
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import robustlab as rl
from robustlab.cli import main
from robustlab.cli_args import build_parser
from robustlab.cli_out import default_folder

NET = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        """A user's own classifier of 28x28 grayscale images (not a robustlab model)."""

        def __init__(self, num_classes=10, width=8):
            super().__init__()
            self.conv = nn.Conv2d(1, width, 3, padding=1)
            self.fc = nn.Linear(width * 7 * 7, num_classes)

        def forward(self, x):
            x = nn.functional.avg_pool2d(torch.relu(self.conv(x)), 4)
            return self.fc(x.flatten(1))
''')
EPS = 0.15
FGSM = ["--eps", str(EPS), "--attack", "fgsm", "--quiet", "--device", "cpu"]


@pytest.fixture
def env(monkeypatch, fake_fmnist, tmp_path):
    monkeypatch.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
    monkeypatch.setenv("ROBUSTLAB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # a --model run writes under runs/<NAME>/ here


@pytest.fixture
def own(tmp_path, env):
    """net.py:Net, an instance trained a little on the fake Fashion-MNIST, its weights saved
    as a DataParallel state dict (keys ``module.*``) in w.pt, and converted to w.safetensors."""
    (tmp_path / "net.py").write_text(NET)
    spec = f"{tmp_path / 'net.py'}:Net"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = rl.models.from_spec(spec)
        x, y = rl.data.load("fashion-mnist", split="train", n=256)
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(30):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    state = nn.DataParallel(copy.deepcopy(model)).state_dict()
    assert all(k.startswith("module.") for k in state)
    torch.save(state, tmp_path / "w.pt")
    return {
        "spec": spec,
        "model": model,
        "pt": tmp_path / "w.pt",
        "weights": tmp_path / "w.safetensors",
    }


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _convert(own, capsys) -> None:
    assert main(["convert-weights", str(own["pt"]), str(own["weights"])]) == 0
    capsys.readouterr()


def _results(folder) -> dict:
    return json.loads((folder / "results.json").read_text())


# --- convert-weights, then evaluate --model: the CLI equals the Python API ---------------------
def test_convert_then_evaluate_equals_python(own, tmp_path, capsys):
    pt, st = own["pt"], own["weights"]
    assert main(["convert-weights", str(pt), str(st)]) == 0
    out = capsys.readouterr().out
    assert "converted 4 tensors (the whole file)" in out
    assert "prefixes stripped: module." in out and f"record: {st}.json" in out
    assert hashlib.sha256(pt.read_bytes()).hexdigest() in out
    assert main(["convert-weights", str(pt), str(st)]) == 2  # OUT is there: kept
    _one_line_error(capsys, str(st), "--overwrite")
    assert main(["convert-weights", str(pt), str(st), "--overwrite"]) == 0

    assert (
        main(
            [
                "evaluate",
                "--model",
                own["spec"],
                "--weights",
                str(st),
                "--data",
                "fashion-mnist",
                "--n",
                "16",
                *FGSM,
            ]
        )
        == 0
    )
    (folder,) = (tmp_path / "runs" / "Net").glob("eval-linf-0.15-fgsm-n16-seed0-*")
    rec = _results(folder)
    x, y = rl.data.load("fashion-mnist", split="test", n=16)
    expected = rl.evaluate(
        own["model"], x, y, rl.ThreatModel("linf", EPS), attacks=["fgsm"], seed=0
    )
    assert rec["robust_accuracy"] == expected.robust_accuracy
    assert rec["clean_accuracy"] == expected.clean_accuracy
    assert 0 < expected.robust_accuracy < expected.clean_accuracy  # the attack broke some
    cfg = rec["config"]
    assert cfg["checkpoint"] is None and cfg["model"] == own["spec"] and cfg["name"] == "Net"
    assert cfg["weights_sha256"] == hashlib.sha256(st.read_bytes()).hexdigest()
    assert rec["config"]["classes"] == list(rl.data.info("fashion-mnist").classes)


def test_normalize_and_model_options_reach_the_model(own, tmp_path, capsys):
    _convert(own, capsys)
    out = tmp_path / "normalized"
    assert (
        main(
            [
                "evaluate",
                "--model",
                own["spec"],
                "--weights",
                str(own["weights"]),
                "--model-option",
                "width=8",
                "--normalize",
                "0.5/0.25",
                "--data",
                "fashion-mnist",
                "--n",
                "8",
                "--out",
                str(out),
                *FGSM,
            ]
        )
        == 0
    )
    cfg = _results(out)["config"]
    assert cfg["model_options"] == {"width": 8}
    assert cfg["normalize"] == {"mean": [0.5], "std": [0.25]}


# --- the same images from a folder of PNGs and from an .npz: identical results -----------------
def _same_images(tmp_path):
    """The first 16 test images as a folder of PNGs (one subfolder per class) and as an .npz,
    in the folder's reading order, with the folder's labels."""
    x, y = rl.data.load("fashion-mnist", split="test", n=16)
    order = torch.argsort(y, stable=True)
    pixels = (x[order] * 255).round().to(torch.uint8)
    present = sorted(set(y.tolist()))
    labels = torch.tensor([present.index(v) for v in y[order].tolist()])
    names = [f"class{v}" for v in present]
    for i, (image, label) in enumerate(zip(pixels, labels, strict=True)):
        folder = tmp_path / "images" / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{i:02d}.png")
    np.savez(tmp_path / "images.npz", x=pixels.numpy(), y=labels.numpy(), classes=np.array(names))
    return names


def test_a_folder_of_pngs_and_an_npz_give_identical_results(own, tmp_path, capsys):
    _convert(own, capsys)
    names = _same_images(tmp_path)
    model = ["--model", own["spec"], "--weights", str(own["weights"]), "--n", "16", *FGSM]
    # the folder names fewer classes than the model has: refused unless --num-classes says so
    assert main(["evaluate", *model, "--data", str(tmp_path / "images")]) == 2
    _one_line_error(
        capsys,
        str(tmp_path / "images"),
        f"has {len(names)} classes",
        "returns 10 logits",
        "--num-classes 10",
    )
    recs = []
    for data in ("images", "images.npz"):
        out = tmp_path / f"out-{data}"
        assert (
            main(
                [
                    "evaluate",
                    *model,
                    "--data",
                    str(tmp_path / data),
                    "--num-classes",
                    "10",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        recs.append(_results(out))
        recs[-1]["per_sample"] = (out / "per_sample.jsonl").read_text()
    folder, npz = recs
    for key in ("clean_accuracy", "robust_accuracy", "per_sample"):
        assert folder[key] == npz[key], key
    assert folder["config"]["classes"] == npz["config"]["classes"] == names
    assert folder["config"]["split"] is None


# --- bad inputs: one line each, naming the problem and the fix --------------------------------
def test_a_pt_file_as_weights_names_the_conversion(own, capsys):
    assert (
        main(
            [
                "evaluate",
                "--model",
                own["spec"],
                "--weights",
                str(own["pt"]),
                "--data",
                "fashion-mnist",
                "--n",
                "8",
                *FGSM,
            ]
        )
        == 2
    )
    _one_line_error(capsys, str(own["pt"]), "robustlab convert-weights")


def test_a_pickle_payload_runs_neither_through_convert_nor_weights(tmp_path, env, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state_dict": Payload()}, protocol=2))
    assert main(["convert-weights", str(evil), str(tmp_path / "evil.safetensors")]) == 2
    _one_line_error(capsys, "restricted loader")
    (tmp_path / "net.py").write_text(NET)
    assert (
        main(
            [
                "evaluate",
                "--model",
                f"{tmp_path / 'net.py'}:Net",
                "--weights",
                str(evil),
                "--data",
                "fashion-mnist",
                "--n",
                "8",
                *FGSM,
            ]
        )
        == 2
    )
    _one_line_error(capsys, "robustlab convert-weights")
    assert not marker.exists()


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--model", "net.py", "--data", "fashion-mnist"], ["model spec must be", "net.py"]),
        (["--model", "missing.py:Net", "--data", "fashion-mnist"], ["missing.py", "not found"]),
        (["--data", "fashion-mnist"], ["no model", "--model"]),
        (["m.safetensors", "--model", "net.py:Net", "--data", "fashion-mnist"], ["not both"]),
        (["m.safetensors", "--weights", "w.safetensors"], ["--weights apply to --model"]),
        (["--model", "net.py:Net"], ["needs --data"]),
        (
            ["--model", "net.py:Net", "--data", "fashion-mnist", "--model-option", "width"],
            ["--model-option takes KEY=VALUE"],
        ),
    ],
)
def test_model_arguments_that_are_wrong(argv, needles, env, capsys):
    assert main(["evaluate", *argv, "--n", "8", *FGSM]) == 2
    _one_line_error(capsys, *needles)


def test_bad_normalize_text(own, capsys):
    assert (
        main(
            [
                "evaluate",
                "--model",
                own["spec"],
                "--normalize",
                "0.5,0.5",
                "--data",
                "fashion-mnist",
                "--n",
                "8",
                *FGSM,
            ]
        )
        == 2
    )
    _one_line_error(capsys, "normalize must be MEAN/STD", "'0.5,0.5'")
    assert (
        main(
            [
                "evaluate",
                "--model",
                own["spec"],
                "--normalize",
                "0.5/x",
                "--data",
                "fashion-mnist",
                "--n",
                "8",
                *FGSM,
            ]
        )
        == 2
    )
    _one_line_error(capsys, "'x'", "is not a number")


def test_num_classes_against_the_model(own, capsys):
    assert (
        main(
            [
                "evaluate",
                "--model",
                own["spec"],
                "--num-classes",
                "7",
                "--data",
                "fashion-mnist",
                "--n",
                "8",
                *FGSM,
            ]
        )
        == 2
    )
    _one_line_error(capsys, "fashion-mnist", "returns 10 logits", "num_classes is 7")


def test_labels_out_of_range_name_the_file(own, tmp_path, capsys):
    x, _ = rl.data.load("fashion-mnist", split="test", n=8)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=x.numpy(), y=np.array([0, 1, 2, 12, 3, 0, 1, 2]))
    assert main(["evaluate", "--model", own["spec"], "--data", str(bad), "--n", "8", *FGSM]) == 2
    _one_line_error(capsys, str(bad), "label 12", "10 classes")


def test_a_shape_the_model_refuses(own, tmp_path, capsys):
    bad = tmp_path / "rgb.npz"
    np.savez(bad, x=np.zeros((4, 3, 28, 28), np.uint8), y=np.zeros(4, np.int64))
    assert main(["evaluate", "--model", own["spec"], "--data", str(bad), "--n", "4", *FGSM]) == 2
    _one_line_error(capsys, str(bad), "refuses inputs of shape (2, 3, 28, 28)")


def test_data_options_that_do_not_apply(own, tmp_path, capsys):
    _same_images(tmp_path)
    npz = str(tmp_path / "images.npz")
    base = ["evaluate", "--model", own["spec"], "--n", "8", *FGSM]
    assert main([*base, "--data", npz, "--split", "train"]) == 2
    _one_line_error(capsys, "--split train applies to registered data sets", npz)
    assert main([*base, "--data", npz, "--resize", "32,32"]) == 2
    _one_line_error(capsys, "--resize applies to a --data folder", npz)
    assert main([*base, "--data", "fashion-mnist", "--resize", "32,32"]) == 2
    _one_line_error(capsys, "--resize applies to a --data folder", "28x28")
    assert main([*base, "--data", str(tmp_path / "nothing-here")]) == 2
    _one_line_error(capsys, "no registered data set", "nothing-here")


# --- folders: two different runs never share one -----------------------------------------------
def test_model_runs_are_named_from_all_their_settings():
    def folder(*argv: str):
        return default_folder(build_parser().parse_args(["evaluate", *argv, "--eps", "0.1"]))

    base = ("--model", "net.py:Net", "--data", "x.npz")
    first = folder(*base)
    assert first.parent.as_posix() == "runs/Net"
    assert first.name.startswith("eval-linf-0.1-standard-n1000-seed0-")
    others = [
        folder(*base, *extra)
        for extra in (
            ["--weights", "a.safetensors"],
            ["--weights", "b.safetensors"],
            ["--normalize", "0.5/0.2"],
            ["--model-option", "width=4"],
            ["--resize", "8,8"],
        )
    ]
    others += [
        folder("--model", "net.py:Net", "--data", "y.npz"),
        folder("--model", "other.py:Net", "--data", "x.npz"),
    ]
    assert len({first, *others}) == len(others) + 1
    assert folder(*base, "--device", "cpu", "--num-classes", "10") == first
    assert folder("run/m.safetensors").parent.as_posix() == "run"  # a checkpoint: beside it


def test_certify_and_smooth_take_a_model(own, tmp_path, capsys):
    _convert(own, capsys)
    model = [
        "--model",
        own["spec"],
        "--weights",
        str(own["weights"]),
        "--data",
        "fashion-mnist",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert (
        main(["certify", *model, "--sigma", "0.25", "--n", "20", "--n0", "5", "--n-points", "2"])
        == 0
    )
    (found,) = (tmp_path / "runs" / "Net").glob("certify-*/certify.json")
    assert json.loads(found.read_text())["config"]["model"] == own["spec"]
    assert main(["smooth", *model, "--sigmas", "0.25", "--samples", "2", "--n", "4"]) == 0
    assert list((tmp_path / "runs" / "Net").glob("smooth-*/smoothing.json"))


def test_a_checkpoint_of_an_own_model_loads_with_trust_code(own, tmp_path, capsys):
    _convert(own, capsys)
    ckpt = tmp_path / "saved" / "model.safetensors"
    ckpt.parent.mkdir()
    rl.models.save(rl.models.from_spec(own["spec"], weights=own["weights"]), ckpt)
    argv = ["evaluate", str(ckpt), "--data", "fashion-mnist", "--n", "16", *FGSM]
    assert main(argv) == 2  # it would import net.py: only when asked to
    _one_line_error(capsys, "--trust-code")
    assert main([*argv, "--trust-code"]) == 0
    (results,) = ckpt.parent.glob("eval-*/results.json")
    x, y = rl.data.load("fashion-mnist", split="test", n=16)
    expected = rl.evaluate(
        own["model"], x, y, rl.ThreatModel("linf", EPS), attacks=["fgsm"], seed=0
    )
    assert json.loads(results.read_text())["robust_accuracy"] == expected.robust_accuracy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_model_on_cuda_gives_the_cpu_result(own, tmp_path, capsys):
    _convert(own, capsys)
    argv = [
        "evaluate",
        "--model",
        own["spec"],
        "--weights",
        str(own["weights"]),
        "--data",
        "fashion-mnist",
        "--n",
        "16",
        "--eps",
        str(EPS),
        "--attack",
        "fgsm",
        "--quiet",
    ]
    recs = []
    for device in ("cpu", "cuda"):
        assert main([*argv, "--device", device, "--out", str(tmp_path / device)]) == 0
        recs.append(_results(tmp_path / device))
    assert recs[0]["clean_accuracy"] == recs[1]["clean_accuracy"]
    assert abs(recs[0]["robust_accuracy"] - recs[1]["robust_accuracy"]) <= 1 / 16
