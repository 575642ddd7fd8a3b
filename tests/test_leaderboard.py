"""``benchmarks/leaderboard.py`` end to end on the ``smoke`` budget: two rows trained on a small
Fashion-MNIST-format data set, evaluated, the board written (Markdown, JSON, the report's
HTML), the zoo exported; a finished row is never redone and a killed run resumes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import leaderboard as lb  # noqa: E402

import robustlab as rl  # noqa: E402
from robustlab.config import load_recipe  # noqa: E402
from robustlab.defenses.verify import Verification  # noqa: E402
from robustlab.models import zoo  # noqa: E402
from robustlab.training import Trainer  # noqa: E402


def _argv(tmp: Path, *extra: str) -> list[str]:
    return [
        "--budget",
        "smoke",
        "--rows",
        "natural,pgd-at",
        "--threads",
        "1",
        "--cache",
        str(tmp / "cache"),
        "--results-dir",
        str(tmp / "results"),
        "--zoo-dir",
        str(tmp / "zoo"),
        *extra,
    ]


@pytest.fixture(scope="module")
def board(fake_fmnist, tmp_path_factory):
    """One smoke run of two rows, shared by the tests that read it."""
    tmp = tmp_path_factory.mktemp("board")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
        yield tmp, lb.main(_argv(tmp, "--export-zoo"))


def test_smoke_board_rows_evaluations_report_and_zoo(board):
    tmp, record = board
    rows = {r["row"]: r for r in record["rows"]}
    assert set(rows) == {"natural", "pgd-at"}
    for r in rows.values():
        assert (r["standard"]["suite"], r["standard"]["n"]) == ("standard", 16)
        assert (r["fast"]["suite"], r["fast"]["n"]) == ("fast", 32)
        assert r["budget"]["epochs"] == 1 and r["budget"]["holdout_n"] == 128
        assert r["budget"]["n_train"] == 512 - 128
        assert len(r["curve"]) == r["budget"]["passes"] == 1
        assert r["curve"][0]["holdout_robust_acc"] is not None  # the validation curve
    assert rows["pgd-at"]["budget"]["inner_steps"] == {"steps": 2}  # the smoke cap
    md = (tmp / "results" / "leaderboard.md").read_text()
    assert "| natural | configs/natural.toml" in md and "| pgd-at | configs/pgd_at.toml" in md
    assert "## The seeds' training claims" in md and "free-at: not run yet" in md
    pgd = rows["pgd-at"]["train_config"]["val_attack"]  # the curve names its attack
    assert f"| {pgd['name'].upper()}-{pgd['steps']}: " in md
    assert json.loads((tmp / "results" / "leaderboard.json").read_text())["budget"]["preset"] == (
        "smoke"
    )
    html = (tmp / "results" / "leaderboard.html").read_text()
    assert 'id="leaderboard"' in html and "pgd-at (seed 0)" in html
    # the zoo: the evaluated checkpoint, with a card that says what it is
    assert zoo.zoo_names(tmp / "zoo") == ["fmnist-natural-smallcnn", "fmnist-pgd-at-smallcnn"]
    card = zoo.card("fmnist-pgd-at-smallcnn", tmp / "zoo")
    assert card["budget"]["converged"] is False and "NOT converged" in card["budget"]["summary"]
    assert (
        card["evaluation"]["standard"]["robust_accuracy"]
        == rows["pgd-at"]["standard"]["robust_accuracy"]
    )
    model = zoo.pretrained("fmnist-pgd-at-smallcnn", zoo=tmp / "zoo")
    x, y = rl.data.load("fashion-mnist", split="test", n=card["evaluation"]["clean"]["n"])
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    assert clean == pytest.approx(card["evaluation"]["clean"]["accuracy"], abs=1e-9)


def test_exporting_again_leaves_a_shipped_model_as_it_is(board):
    """An unchanged card, or a converged model against a smoke run, is left as shipped."""
    tmp, record = board
    files = sorted((tmp / "zoo").iterdir())
    before = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    b = lb.budget_of(lb.parse_args(["--budget", "smoke"]))
    written = lb.export_zoo(record["rows"], b, tmp / "zoo", lambda msg: None)
    assert sorted(p.name for p in written) == [f.name for f in files if f.suffix != ".json"]
    assert {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in files} == before
    card = json.loads((tmp / "zoo" / "fmnist-pgd-at-smallcnn.json").read_text())
    card["card"]["train_s"] += 1.0  # another run of the row: written again
    (tmp / "zoo" / "fmnist-pgd-at-smallcnn.json").write_text(json.dumps(card))
    lb.export_zoo(record["rows"], b, tmp / "zoo", lambda msg: None)
    again = json.loads((tmp / "zoo" / "fmnist-pgd-at-smallcnn.json").read_text())
    assert again["card"]["train_s"] == card["card"]["train_s"] - 1.0
    again["card"]["budget"]["converged"] = True  # a converged model is not replaced by a smoke one
    (tmp / "zoo" / "fmnist-pgd-at-smallcnn.json").write_text(json.dumps(again))
    lb.export_zoo(record["rows"], b, tmp / "zoo", lambda msg: None)
    assert json.loads((tmp / "zoo" / "fmnist-pgd-at-smallcnn.json").read_text()) == again


def test_a_finished_row_is_never_redone(board, monkeypatch):
    tmp, first = board

    def refuse(*args, **kwargs):
        raise AssertionError("a finished row was trained again")

    monkeypatch.setattr(Trainer, "run", refuse)
    monkeypatch.setattr(lb.rl, "evaluate", refuse)
    again = lb.main(_argv(tmp))
    assert again["rows"] == first["rows"]


def kill_in_pass_2(monkeypatch) -> list[int]:
    """Make the trainer raise KeyboardInterrupt the first time it starts its second pass; the
    list of the passes (0-based) it started, filled as it runs."""
    original, calls = Trainer._epoch, []

    def killed_in_pass_2(self, epoch):
        calls.append(epoch)
        if epoch == 1 and calls.count(1) == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_epoch", killed_in_pass_2)
    return calls


def test_a_killed_run_resumes_from_its_checkpoint(fake_fmnist, tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
    b = lb.budget_of(lb.parse_args(["--budget", "smoke", "--epochs", "2"]))
    row = lb.ROW["natural"]
    recipe = lb.prepare(row, b, 0, {})
    out = lb.run_dir(tmp_path, row, recipe, b)
    data = rl.data.load("fashion-mnist", split="train", n=b["train_n"])
    calls = kill_in_pass_2(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        lb.train("natural", recipe, out, data, print)
    assert not (out / lb.DONE_FILE).exists()
    done = lb.train("natural", lb.prepare(row, b, 0, {}), out, data, print)
    assert calls == [0, 1, 1]  # pass 1 was not trained again
    assert [r["epoch"] for r in done["history"]] == [1, 2]
    assert done["threads"] == [torch.get_num_threads()] * 2
    assert done["cpus"] == [lb.versions()["cpu"]] * 2
    assert lb.train("natural", recipe, out, data, print) == done  # finished: read back


def test_a_parked_run_resumes_on_another_machine_and_is_dropped_when_its_row_finishes(
    fake_fmnist, tmp_path, monkeypatch
):
    """--park copies an unfinished run to the results (which the repository keeps); a machine
    without the cache resumes it from the parked checkpoint, and the finished row drops it."""
    monkeypatch.setenv("ROBUSTLAB_DATA", str(fake_fmnist))
    argv = [*_argv(tmp_path, "--epochs", "2"), "--rows", "natural"]
    calls = kill_in_pass_2(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        lb.main(argv)
    assert lb.main([*argv, "--park"])["parked"] == [
        str(p) for p in (tmp_path / "results" / lb.PARKED).iterdir()
    ]
    (parked,) = (tmp_path / "results" / lb.PARKED).iterdir()
    assert (parked / lb.STATE_FILE).exists() and not (parked / lb.TB_DIR).exists()
    shutil.rmtree(tmp_path / "cache")  # another machine: the cache is gone
    record = lb.main(argv)
    assert calls == [0, 1, 1]  # pass 1 came from the parked checkpoint
    assert [r["row"] for r in record["rows"]] == ["natural"]
    assert [c["epoch"] for c in record["rows"][0]["curve"]] == [1, 2]
    assert not parked.exists()  # the row finished: its parked copy is dropped
    assert lb.main([*argv, "--park"])["parked"] == []  # a finished row parks nothing


def test_a_rows_runs_are_its_teacher_or_base_run_then_its_own(tmp_path):
    b = lb.budget_of(lb.parse_args(["--budget", "smoke"]))
    (teacher, _, tdir), (name, recipe, own) = lb.runs_of(lb.ROW["uat"], 1, b, tmp_path)
    assert (teacher, name) == ("rst_teacher", "uat") and tdir != own
    assert recipe.train.objective_options["teacher"] == str(tdir / lb.MODEL_FILE)
    assert recipe.train.seed == 1
    (base, base_recipe, bdir), (_, cni, _) = lb.runs_of(lb.ROW["cni"], 1, b, tmp_path)
    assert base == "pgd-at" and base_recipe.train.seed == 0  # the base run is seed 0's
    assert bdir == lb.runs_of(lb.ROW["pgd-at"], 0, b, tmp_path)[0][2]
    assert cni.train.init == str(bdir / lb.MODEL_FILE)
    assert [n for n, *_ in lb.runs_of(lb.ROW["pgd-at"], 0, b, tmp_path)] == ["pgd-at"]


def test_the_where_cell_names_training_threads_and_cpus_that_differ_from_the_evaluations():
    cpu = lb.versions()["cpu"]
    assert lb.where(2, [2, 2, None]) == f"cpu, 2 threads, {cpu}"  # None: passes not recorded
    assert lb.where(2, [1, 1, 2, 2, 2]) == (
        f"cpu, 2 threads, {cpu} (training passes 1-2 on 1, 3-5 on 2 threads)"
    )
    assert lb.where(1, [None, 2]).endswith("(training passes 1 on ?, 2 on 2 threads)")
    assert lb.where(2, [2, 2], [cpu, None]) == f"cpu, 2 threads, {cpu}"
    assert lb.where(2, [1, 2, 2], ["Other CPU", "Other CPU", cpu]).endswith(
        "(training passes 1 on 1 threads of Other CPU, 2 on 2 threads of Other CPU, "
        f"3 on 2 threads of {cpu})"
    )


def test_a_certified_point_that_an_attack_broke_stops_the_row():
    """The verified column is a lower bound on the standard suite's per-point robustness: a
    certified point that the suite broke (or misclassified) means an unsound bound."""

    def ver(certified: list[bool]) -> Verification:
        return Verification("ibp", torch.zeros(len(certified), 9), torch.tensor(certified))

    lb.check_below_empirical(ver([True, False, False]), torch.tensor([True, True, False]))
    with pytest.raises(RuntimeError, match=r"1 point\(s\) verified by ibp were broken.*point 2"):
        lb.check_below_empirical(ver([True, False, True]), torch.tensor([True, True, False]))


def test_a_smoothed_row_is_not_exported_to_the_zoo(tmp_path):
    """Its figures are its smoothed classifier's, not those of the model the zoo would load."""
    rec = {"seed": 0, "row": "gaussian-aug", "architecture": {"name": "smallcnn"},
           "checkpoint": str(tmp_path / "missing.safetensors")}  # fmt: skip
    logged: list[str] = []
    assert lb.export_zoo([rec], lb.PRESETS["short"], tmp_path / "zoo", logged.append) == []
    assert logged == [
        "zoo: fmnist-gaussian-aug-smallcnn not exported: its figures are those of its smoothed "
        "classifier"
    ]


def test_a_best_row_whose_best_epoch_is_the_last_takes_the_final_evaluation(
    board, tmp_path, monkeypatch
):
    """pgd-at-best shares pgd-at's training run; when its best epoch is the last (the smoke
    run's one pass) it holds the final weights, so it is neither trained nor attacked again,
    says so on the board and does not ship a second copy of the weights in the zoo."""
    tmp, first = board
    shutil.copytree(tmp / "cache", tmp_path / "cache")

    def refuse(*args, **kwargs):
        raise AssertionError("the same weights were trained or evaluated again")

    monkeypatch.setattr(Trainer, "run", refuse)
    monkeypatch.setattr(lb.rl, "evaluate", refuse)
    record = lb.main([*_argv(tmp_path, "--export-zoo"), "--rows", "pgd-at-best"])
    (best,) = [r for r in record["rows"] if r["row"] == "pgd-at-best"]
    (final,) = [r for r in first["rows"] if (r["row"], r["seed"]) == ("pgd-at", 0)]
    assert best["same_as_final"] is True and Path(best["checkpoint"]).name == lb.BEST_FILE
    for column in ("standard", "fast"):
        assert best[column]["robust_accuracy"] == final[column]["robust_accuracy"]
        assert Path(best[column]["folder"]).name == Path(final[column]["folder"]).name
    assert "| pgd-at-best | " in (md := (tmp_path / "results" / "leaderboard.md").read_text())
    assert "model_best (epoch 1, = final)" in md
    assert "fmnist-pgd-at-best-smallcnn" not in zoo.zoo_names(tmp_path / "zoo")


def test_a_run_folder_trained_again_is_neither_shipped_nor_rendered(board, tmp_path):
    """A row's run folder trained again (another row sharing it, on a machine without the
    record's run) holds other weights: the zoo keeps the shipped model and the HTML board
    leaves the row out rather than show the other run under its name."""
    tmp, first = board
    (rec,) = [r for r in first["rows"] if (r["row"], r["seed"]) == ("pgd-at", 0)]
    run = Path(rec["run"])
    assert lb.same_run(rec, run)
    other = json.loads(json.dumps(rec))
    other["curve"][0]["train_loss"] += 1e-3  # the record of another run of the same recipe
    assert not lb.same_run(other, run)
    logged: list[str] = []
    zoo_dir = tmp_path / "zoo"
    shutil.copytree(tmp / "zoo", zoo_dir)
    before = (zoo_dir / "fmnist-pgd-at-smallcnn.json").read_text()
    b = lb.budget_of(lb.parse_args(["--budget", "smoke"]))
    assert lb.export_zoo([other], b, zoo_dir, logged.append) == [
        zoo_dir / "fmnist-pgd-at-smallcnn.safetensors"
    ]
    assert "was trained again" in logged[0]
    assert (zoo_dir / "fmnist-pgd-at-smallcnn.json").read_text() == before
    folders, absent = lb.report_runs([other], tmp_path / "results", logged.append)
    assert (folders, absent) == ([], ["pgd-at (seed 0)"])


def test_same_weights_compares_the_tensors_not_the_metadata(tmp_path):
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2)}
    save_file(tensors, tmp_path / "a.safetensors", metadata={"epoch": "1"})
    save_file(tensors, tmp_path / "b.safetensors", metadata={"epoch": "2"})
    assert lb.same_weights(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    save_file(tensors | {"b": torch.tensor([0.0, 1e-6])}, tmp_path / "c.safetensors")
    assert not lb.same_weights(tmp_path / "a.safetensors", tmp_path / "c.safetensors")
    save_file({"w": tensors["w"]}, tmp_path / "d.safetensors")
    assert not lb.same_weights(tmp_path / "a.safetensors", tmp_path / "d.safetensors")


def test_a_randomised_rows_card_tolerates_its_majority_votes_spread():
    """A deterministic evaluation records no randomness and keeps one point in n; a randomised
    one (pni: a majority of 10 predictions) records its repeats and standard errors, and its
    clean tolerance widens by 3 standard errors of a difference of two such figures."""
    record = {"n": 1000, "repeats": 1, "clean_accuracy_se": 0.0, "robust_accuracy_se": 0.0}
    assert lb.randomness(record) == {}
    assert lb.clean_tolerance({"n": 1000}) == pytest.approx(0.001)
    record |= {"repeats": 10, "clean_accuracy_se": 0.002, "robust_accuracy_se": 0.003}
    summary = {"n": 1000, **lb.randomness(record)}
    assert summary["repeats"] == 10 and summary["robust_accuracy_se"] == 0.003
    assert lb.clean_tolerance(summary) == pytest.approx(0.001 + 3 * 2**0.5 * 0.002)
    summary["clean_accuracy_se"] = 0.0  # every draw agreed: floored at one point in n
    assert lb.clean_tolerance(summary) == pytest.approx(0.001 + 3 * 2**0.5 * 0.001)


def test_the_curve_cell_falls_back_to_clean_accuracy_without_a_robust_check():
    rec = {"train_config": {"val_attack": {"name": "pgd", "steps": 20}},
           "curve": [{"holdout_robust_acc": 0.6, "holdout_clean_acc": 0.8},
                     {"holdout_robust_acc": 0.65, "holdout_clean_acc": 0.82}]}  # fmt: skip
    assert lb._curve(rec) == "PGD-20: 60 65"
    for c in rec["curve"]:
        c["holdout_robust_acc"] = None  # a noise-trained row checks clean accuracy only
    assert lb._curve(rec) == "clean: 80 82"
    rec["curve"][1]["lesson"] = 1  # the curriculum's lesson, where the objective logs it
    assert lb._curve(rec) == "clean: 80 82 (lessons - 1)"


def test_the_curve_cell_names_a_training_threat_that_is_not_the_boards():
    rec = {"train_config": {"val_attack": {"name": "pgd", "steps": 10}},
           "curve": [{"holdout_robust_acc": 0.73}, {"holdout_robust_acc": 0.76}]}  # fmt: skip
    assert lb._curve(rec) == "PGD-10: 73 76"  # a record from before train_threat: the board's
    rec["train_threat"] = lb.THREAT.to_dict()
    assert lb._curve(rec) == "PGD-10: 73 76"
    rec["train_threat"] = {"norm": "l2", "eps": 0.5, "bounds": [0.0, 1.0]}  # smoothadv's
    assert lb._curve(rec) == "PGD-10 at l2 0.5: 73 76"


def test_inner_steps_include_the_base_objectives():
    opts = {"teacher": "t.safetensors", "base": "trades", "base_options": {"steps": 10}}
    assert lb._inner_steps(opts) == {"base steps": 10}
    assert lb._inner_steps({"steps": 10, "step_size": 0.025}) == {"steps": 10}


def test_budget_presets_and_overrides_are_recorded():
    b = lb.budget_of(lb.parse_args(["--budget", "smoke", "--fast-n", "7"]))
    assert (b["preset"], b["fast_n"], b["standard_n"], b["epochs"]) == ("smoke", 7, 16, 1)
    conv = lb.budget_of(lb.parse_args([]))
    assert (conv["standard_n"], conv["fast_n"], conv["epochs"]) == (1000, 10000, None)
    assert lb.budget_key(b) != lb.budget_key(conv)
    recipe = lb.prepare(lb.ROW["free-at"], conv, 0, {})
    assert recipe.train.epochs == 40 and recipe.train.objective_options["replays"] == 8
    assert recipe.train.val_split == 1000 and recipe.train.keep_best
    # a preset's epochs are passes over the data: free-at trains m epochs' worth of steps each
    assert lb.prepare(lb.ROW["free-at"], b, 0, {}).train.epochs == 8
    assert lb.prepare(lb.ROW["pgd-at"], b, 0, {}).train.epochs == 1
    assert lb.replays(lb.prepare(lb.ROW["free-at"], conv, 0, {}).train) == 8
    rst = lb.prepare(lb.ROW["rst"], b, 0, {"rst_teacher": Path("t.safetensors")})
    assert rst.n_train == round(30000 * 512 / 60000) and rst.unlabeled_n == rst.n_train
    assert rst.train.objective_options["base_options"]["steps"] == 2


@pytest.mark.parametrize("preset", sorted(lb.PRESETS))
def test_every_rows_recipe_is_valid_at_every_preset(preset):
    """``prepare`` validates the recipe: a row the trainer would refuse (trades-awp's warm-up
    once outlasted the short budget) fails here, not hours into a board."""
    b = lb.budget_of(lb.parse_args(["--budget", preset]))
    deps = {name: Path(f"{name}.safetensors") for name in ("rst_teacher", "pgd-at")}
    for row in lb.ROWS:
        recipe = lb.prepare(row, b, 0, deps)
        assert recipe.train.epochs >= 1, row.name
    awp = lb.prepare(lb.ROW["trades-awp"], b, 0, deps).train
    assert awp.awp and awp.awp_warmup < awp.epochs


def test_every_claim_names_rows_of_the_board():
    """A claim's rows are looked up by name; a misspelt one would read "not run yet" forever."""
    for what, _, names in lb.CLAIMS:
        assert set(names) <= set(lb.ROW), (what, set(names) - set(lb.ROW))


def test_the_top_rows_rank_the_standard_suite_only():
    """pni's figure in the ``standard`` column comes from the ``rand`` suite and cni's from
    ``smoothed``: other attacks, so they do not rank beside the rows ``standard`` attacked."""

    def rec(row, suite, acc, seed=0):
        return {"row": row, "seed": seed, "standard": {"suite": suite, "robust_accuracy": acc}}

    recs = [rec("natural", "standard", 0.0), rec("free-at", "standard", 0.74),
            rec("pni", "rand", 0.68), rec("cni", "smoothed", 0.65), rec("yopo", "standard", 0.66),
            rec("alp", "standard", 0.657), rec("alp", "standard", 0.70, seed=1)]  # fmt: skip
    assert lb.top_rows(recs, 5) == ["free-at", "yopo", "alp"]


def test_a_best_checkpoint_row_with_the_final_weights_does_not_take_a_top_place():
    """pgd-at-best whose best epoch was the last is pgd-at's model: the five best rows are
    five models, so trades-best (its own best epoch) takes the place."""

    def rec(row, acc, **extra):
        return {"row": row, "seed": 0, "standard": {"suite": "standard", "robust_accuracy": acc},
                **extra}  # fmt: skip

    recs = [rec("pgd-at", 0.77), rec("pgd-at-best", 0.77, same_as_final=True),
            rec("mart", 0.756), rec("trades-best", 0.726, same_as_final=False),
            rec("trades-b6", 0.719)]  # fmt: skip
    assert lb.top_rows(recs, 3) == ["pgd-at", "mart", "trades-best"]


def test_a_second_seed_for_the_top_rows_with_the_spread(board):
    tmp, _ = board
    record = lb.main(_argv(tmp, "--seeds", "2"))
    seeds = sorted((r["row"], r["seed"]) for r in record["rows"])
    assert seeds == [("natural", 0), ("pgd-at", 0), ("pgd-at", 1)]  # natural is never seeded
    (line,) = [s for s in (tmp / "results" / "leaderboard.md").read_text().splitlines()
               if s.startswith("| pgd-at |")]  # fmt: skip
    vals = [r["standard"]["robust_accuracy"] for r in record["rows"] if r["row"] == "pgd-at"]
    assert (
        f"| 2: mean {100 * sum(vals) / 2:.1f}%, spread {100 * (max(vals) - min(vals)):.1f} pts |"
        in line
    )


def test_seed_runs_the_rows_at_that_seed(board):
    tmp, first = board
    record = lb.main(_argv(tmp, "--rows", "natural", "--seed", "1"))
    (second,) = [r for r in record["rows"] if (r["row"], r["seed"]) == ("natural", 1)]
    (zero,) = [r for r in first["rows"] if (r["row"], r["seed"]) == ("natural", 0)]
    assert second["train_config"]["seed"] == 1 and second["run"] != zero["run"]


def test_a_fresh_clone_keeps_the_committed_rows_and_renders_their_archived_runs(
    board, tmp_path, monkeypatch
):
    """Without the cache (a fresh clone, another machine) the rows of the committed board
    record are taken back, not redone; the HTML board is rendered from the archived run
    folders; the zoo keeps a shipped model whose checkpoint is not here."""
    tmp, _ = board
    results, zoo_dir = tmp_path / "results", tmp_path / "zoo"
    shutil.copytree(tmp / "results", results)
    shutil.copytree(tmp / "zoo", zoo_dir)
    committed = json.loads((results / "leaderboard.json").read_text())["rows"]
    runs = {Path(r["run"]) for r in committed}
    assert sorted(p.name for p in (results / lb.ARCHIVE).iterdir()) == sorted(r.name for r in runs)
    weights = {p.name for p in (results / lb.ARCHIVE).rglob("*.safetensors")}
    assert weights <= {"examples.safetensors"}  # the report's inputs, no weights

    def refuse(*args, **kwargs):
        raise AssertionError("a finished row was trained or evaluated again")

    monkeypatch.setattr(Trainer, "run", refuse)
    monkeypatch.setattr(lb.rl, "evaluate", refuse)

    def without_cache(*extra: str) -> dict:
        hidden = {run: run.with_name(run.name + "-gone") for run in runs}
        for run, away in hidden.items():  # the machine's cache is gone
            run.rename(away)
        try:
            return lb.main([*_argv(tmp_path, *extra), "--cache", str(tmp_path / "new-cache")])
        finally:
            for run, away in hidden.items():
                away.rename(run)

    again = without_cache("--export-zoo")
    assert again["rows"] == committed
    html = (results / "leaderboard.html").read_text()
    assert "pgd-at (seed 0)" in html and "natural (seed 0)" in html
    assert "leaves out" not in (results / "leaderboard.md").read_text()
    assert zoo.zoo_names(zoo_dir) == ["fmnist-natural-smallcnn", "fmnist-pgd-at-smallcnn"]
    # a row neither here nor archived stays on the board from its record, named as not in the HTML
    (gone,) = [r for r in committed if (r["row"], r["seed"]) == ("natural", 0)]
    shutil.rmtree(results / lb.ARCHIVE / Path(gone["run"]).name)
    without_cache()
    md = (results / "leaderboard.md").read_text()
    assert "leaves out natural (seed 0):" in md and "| natural | " in md
    assert "natural (seed 0)" not in (results / "leaderboard.html").read_text()


def test_a_recipe_and_seed_give_the_same_initial_weights(tmp_path):
    """torch seeds its generator at random when a process starts: a row's model draws its
    weights from ``train.seed`` instead, and leaves the caller's generator as it was."""
    recipe = load_recipe(lb.CONFIGS / "pgd_at.toml")
    state = torch.get_rng_state()
    a, b = lb.seeded_model(recipe), lb.seeded_model(recipe)
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.robustlab_arch["kwargs"]["num_classes"] == rl.data.info("fashion-mnist").num_classes
    recipe.train.seed += 1
    key = "feature_extractor.conv1.weight"
    assert not torch.equal(a.state_dict()[key], lb.seeded_model(recipe).state_dict()[key])
