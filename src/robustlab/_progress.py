"""Run logs shared by training and evaluation: append-only JSONL event logs and optional
TensorBoard scalars.

A JSONL log gets one JSON object per line, each line written and flushed on its own, so a
crash loses nothing that was written and a resumed run appends after it. TensorBoard is an
optional dependency (``pip install tensorboard``), imported only when asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

INSTALL_TENSORBOARD = "pip install tensorboard"


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (created with its directory if missing)
    and flush it to the operating system before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def tensorboard_available(required: bool | None) -> bool:
    """Whether to write TensorBoard scalars: ``False`` never, ``None`` if the ``tensorboard``
    package is importable, ``True`` always (an ImportError naming the install command if it is
    not importable)."""
    if required is not None and not isinstance(required, bool):
        raise TypeError(
            f"tensorboard must be True, False or None (on if installed), got {required!r}"
        )
    if required is False:
        return False
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        if required:
            raise ImportError(
                f"tensorboard=True needs the tensorboard package: "
                f"{INSTALL_TENSORBOARD} (or pass tensorboard=False)"
            ) from e
        return False
    return True
