"""Where data files come from: the search order, the cache directory, checked downloads.

Search order for the files of one split of a data set ``name``:

1. ``root`` if given, else ``$ROBUSTLAB_DATA`` -- first its subdirectory ``<name>``, then the
   directory itself (subdirectory first, since MNIST and Fashion-MNIST share file names);
2. system directories from distribution packages (``SYSTEM_DIRS``, e.g. Debian's
   ``/usr/share/datasets/fashion-mnist``);
3. the cache, ``$XDG_CACHE_HOME/robustlab/<name>`` or ``~/.cache/robustlab/<name>``;
4. a download of the official files into the cache, unless ``download=False`` or
   ``ROBUSTLAB_OFFLINE=1``. Each download is verified against its SHA-256 before it is renamed
   into place, so the cache never holds a partial or wrong file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),)
}
SYSTEM_PACKAGES: dict[str, str] = {"fashion-mnist": "dataset-fashion-mnist"}
_CHUNK = 1 << 20  # bytes read per network call
_TIMEOUT_S = 60.0  # seconds without data before a download is abandoned


@dataclass(frozen=True)
class Resource:
    """One official file: its name, its URL, its SHA-256 (hex) and its size in bytes.

    ``also`` lists names accepted in its place on disk: the decompressed IDX file, or the
    folder a CIFAR archive extracts to.
    """

    filename: str
    url: str
    sha256: str
    size: int
    also: tuple[str, ...] = ()

    def find_in(self, directory: Path) -> Path | None:
        """The first of this file's accepted names present in ``directory``, or None."""
        for name in (self.filename, *self.also):
            if (directory / name).exists():
                return directory / name
        return None


def cache_dir(name: str) -> Path:
    """The download cache of data set ``name``: ``$XDG_CACHE_HOME/robustlab/<name>``, with
    ``~/.cache`` when ``XDG_CACHE_HOME`` is unset or empty."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "robustlab" / name


def search_dirs(name: str, root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The directories searched for data set ``name``, in order (see the module docstring)."""
    dirs: list[Path] = []
    base = root if root is not None else os.environ.get("ROBUSTLAB_DATA")
    if base:
        given = Path(base).expanduser()
        dirs += [given / name, given]
    dirs += SYSTEM_DIRS.get(name, ())
    dirs.append(cache_dir(name))
    return dirs


def offline() -> bool:
    """True when the environment forbids downloads (``ROBUSTLAB_OFFLINE=1``)."""
    return os.environ.get("ROBUSTLAB_OFFLINE", "").strip().lower() in {"1", "true", "yes"}


def locate(
    name: str,
    split: str,
    resources: Sequence[Resource],
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> list[Path]:
    """Paths of all ``resources`` of one split, taken together from the first directory that
    holds every one of them; else the cache, downloading what it lacks.

    Raises ``FileNotFoundError`` with instructions when the files are absent and cannot be
    downloaded, and ``ValueError`` when a download fails its checksum.
    """
    dirs = search_dirs(name, root)
    for directory in dirs:
        found = [r.find_in(directory) for r in resources]
        if all(p is not None for p in found):
            logger.debug("%s/%s: using %s", name, split, directory)
            return [p for p in found if p is not None]
    if not download or offline():
        switch = "download=False" if not download else "ROBUSTLAB_OFFLINE=1"
        reason = f"downloading is off ({switch})"
        raise FileNotFoundError(_missing(name, split, resources, dirs, reason))
    cache = cache_dir(name)
    try:
        return [r.find_in(cache) or fetch(r, cache) for r in resources]
    except OSError as err:  # URLError, timeouts, refused connections, unwritable cache
        reason = f"download failed: {err}"
        raise FileNotFoundError(_missing(name, split, resources, dirs, reason)) from err


def sha256_of(path: Path) -> str:
    """Hex SHA-256 digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(resource: Resource, directory: Path) -> Path:
    """Download ``resource`` into ``directory`` and return its path.

    The bytes go to a temporary file in the same directory, are checked against
    ``resource.sha256`` and only then renamed (atomically) to ``resource.filename``. On a
    mismatch the file is deleted and ``ValueError`` names the expected and actual digests.
    """
    directory.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{resource.filename}.", dir=directory)
    os.close(handle)
    temp = Path(temp_name)
    try:
        _download(resource.url, temp)
        actual = sha256_of(temp)
        if actual != resource.sha256:
            raise ValueError(
                f"checksum mismatch for {resource.url}: expected sha256 {resource.sha256}, "
                f"got {actual} ({temp.stat().st_size} bytes, expected {resource.size}); the file "
                "was deleted. Retry, or download it by hand and compare with `sha256sum`."
            )
        target = directory / resource.filename
        os.replace(temp, target)
        return target
    finally:
        temp.unlink(missing_ok=True)


def _download(url: str, dest: Path) -> None:
    """Write the bytes at ``url`` to ``dest`` (the only function here touching the network)."""
    request = urllib.request.Request(url, headers={"User-Agent": "robustlab"})
    with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        logger.info("downloading %s (%.1f MB) to %s", url, total / 1e6, dest.parent)
        done, next_report = 0, 0.1
        while block := response.read(_CHUNK):
            out.write(block)
            done += len(block)
            if total and done / total >= next_report:
                logger.info("  %3.0f%% of %.1f MB", 100 * done / total, total / 1e6)
                next_report += 0.1
    logger.info("downloaded %s (%.1f MB)", url, done / 1e6)


def _missing(
    name: str, split: str, resources: Sequence[Resource], dirs: Sequence[Path], reason: str
) -> str:
    """The message of the ``FileNotFoundError`` raised when no copy of the files is found."""
    files = ", ".join(r.filename for r in resources)
    lines = [f"data set {name!r} (split {split!r}) not found: looked for {files} in"]
    lines += [f"    {d}" for d in dirs]
    lines += [f"and {reason}. To get the data:"]
    if name in SYSTEM_PACKAGES:
        lines.append(f"  - on Debian/Ubuntu: sudo apt-get install {SYSTEM_PACKAGES[name]}")
    lines.append("  - download by hand")
    lines += [f"      {r.url}  ({r.size} bytes, sha256 {r.sha256})" for r in resources]
    lines.append(f"    and put them in {cache_dir(name)}")
    lines.append(
        f"  - or put them in a directory of your choice (or its subdirectory {name!r}) and set "
        "ROBUSTLAB_DATA=<that directory> or pass root=<that directory>"
    )
    lines.append("  - or let robustlab download them: download=True, ROBUSTLAB_OFFLINE unset.")
    return "\n".join(lines)
