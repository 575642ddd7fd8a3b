"""What the trainer shows of an epoch record (a line of ``train_log.jsonl``): its TensorBoard
scalars and the progress bar's postfix."""

from __future__ import annotations

from typing import Any

# TensorBoard tag <- train_log.jsonl key; "time/epoch_s" is train_time_s + val_time_s
TB_SCALARS = (
    ("train/loss", "train_loss"),
    ("train/lr", "lr"),
    ("val/clean_accuracy", "val_clean_acc"),
    ("val/robust_accuracy", "val_robust_acc"),
    ("probe/robust_accuracy", "probe_robust_acc"),
    ("holdout/clean_accuracy", "holdout_clean_acc"),
    ("holdout/robust_accuracy", "holdout_robust_acc"),
)


def scalars(rec: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """One epoch record's TensorBoard scalars (:data:`TB_SCALARS`, ``time/epoch_s``) and its
    step, the epoch."""
    values = {tag: rec[key] for tag, key in TB_SCALARS if key in rec}
    values["time/epoch_s"] = rec["train_time_s"] + rec.get("val_time_s", 0.0)
    return rec["epoch"], values


def postfix(
    epoch: int, passes: int, now: dict[str, Any], history: list[dict[str, Any]]
) -> dict[str, str]:
    """The bar's postfix: epoch ``epoch`` (0-based) of the passes, the running loss and
    learning rate in ``now``, and the validation accuracies of the last finished epoch."""
    post = {
        "epoch": f"{epoch + 1}/{passes}",
        "loss": f"{now['train_loss']:.4f}",
        "lr": f"{now['lr']:.3g}",
    }
    last = history[-1] if history else {}
    for key, name in (("val_clean_acc", "val_clean"), ("val_robust_acc", "val_robust")):
        if key in last:
            post[name] = f"{100 * last[key]:.1f}%"
    return post
