"""The user's own data: a folder of images (:func:`from_folder`) or an array file
(:func:`from_arrays`), read into the same float32 NCHW images in [0, 1] and int64 labels as the
registered data sets, checked once (:func:`_images`) before any model sees them.

Nothing is ever unpickled: ``.npz`` files are read with ``allow_pickle=False`` and an object
array in one is refused; ``.safetensors`` files hold raw tensors only.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch import Tensor

from robustlab._validate import check_inputs, positive_int

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
_GRAY_MODES = ("1", "L", "LA")  # read as one channel (alpha dropped)
_RGB_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")
_X_DTYPES = ("uint8", "float16", "bfloat16", "float32", "float64")
_Y_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
_PICKLE_FIX = (
    "robustlab never unpickles data; save numbers as numeric arrays and class names "
    "as a string array, np.array(names) (dtype '<U...'), not dtype=object"
)


class Images(NamedTuple):
    """Images and labels read from the user's files.

    ``x``: float32 ``(N, C, H, W)``, C = 1 (grayscale) or 3 (RGB), values in [0, 1];
    ``y``: int64 ``(N,)``, class indices >= 0 (< ``len(classes)`` when ``classes`` is given);
    ``classes``: class names indexed by label, or None when the source names none;
    ``source``: where they came from (the path), for error messages and provenance.
    """

    x: Tensor
    y: Tensor
    classes: list[str] | None
    source: str


def _images(x: Tensor, y: Tensor, classes: list[str] | None, source: str) -> Images:
    """The one check both readers end with: ``x`` float (N, C, H, W) finite in [0, 1] (as
    :func:`robustlab._validate.check_inputs`, plus the range), ``y`` (N,) labels >= 0, below
    ``len(classes)``; every error starts with ``source``."""
    try:
        check_inputs(x, y)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{source}: x has values in [{lo:.4g}, {hi:.4g}], outside [0, 1]; robustlab takes "
            "pixel values in [0, 1]: divide 8-bit values by 255 (x / 255) or clip with "
            "np.clip(x, 0, 1); data normalised with a mean/std must be un-normalised "
            "(x * std + mean) and the normalisation given to the model instead"
        )
    if classes is not None and y.numel() and int(y.max()) >= len(classes):
        raise ValueError(
            f"{source}: label {int(y.max())} is out of range for the {len(classes)} class "
            f"names given (valid labels 0..{len(classes) - 1}); give one name per class"
        )
    return Images(x.contiguous(), y, classes, source)


def _first(n: int | None, total: int, source: str) -> int:
    """``n`` checked against the ``total`` number of images (None: all of them)."""
    if n is None:
        return total
    n = positive_int(n, "n")
    if n > total:
        raise ValueError(f"n={n} but {source} holds only {total} images; pass n <= {total}")
    return n


# ---------------------------------------------------------------- folders


def from_folder(
    path: str | os.PathLike[str], *, resize: tuple[int, int] | None = None, n: int | None = None
) -> Images:
    """Images in the class-per-subfolder layout ``path/<class name>/<image>``, as
    torchvision's ``ImageFolder``: classes are the subfolders sorted by name, the label of an
    image is the index of its class; ``classes`` holds the folder names.

    Order: class by class, and within a class files sorted by name (Python's ``sorted``, code
    point order: ``img10.png`` before ``img2.png``), so the same folder always gives the same
    tensors. Entries whose name starts with ``.`` are ignored at both levels (a
    ``.ipynb_checkpoints`` folder is no class), so are files directly inside ``path`` (a
    README); anything else in a class folder must be an image.

    Formats: PNG, JPEG, BMP, WebP (suffixes ``.png .jpg .jpeg .bmp .webp``, any case), decoded
    by Pillow as 8-bit pixels / 255. Grayscale images (Pillow modes ``1``, ``L``, ``LA``) give
    one channel, colour images three: RGB as is, RGBA and palette images converted to RGB (the
    alpha channel is dropped, not blended). A folder mixing grayscale and colour images is an
    error (the model takes one channel count): convert them all to one mode first. 16- and
    32-bit images (modes ``I;16``, ``I``, ``F``) are refused: save them as 8-bit images.

    Args:
        path: the root folder.
        resize: ``(H, W)`` in pixels: resize every image to it with Pillow's bilinear filter.
            Without it all images must have one size; a folder of different sizes is an error
            naming two of them (CLI: ``--resize H,W``).
        n: read only the first ``n`` images in the order above (``1 <= n <= N``); this is
            not a stratified subset: with n < N the last classes may be missing. Only those
            ``n`` files are opened and checked. ``None`` reads all.

    Returns:
        :class:`Images` with ``x`` float32 ``(N, C, H, W)`` in [0, 1], ``y`` int64 ``(N,)``,
        ``classes`` the sorted subfolder names (all of them, even with ``n``), ``source``
        the path.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a folder, is empty, has no class subfolders; a class
            folder holds no image or a file that is not one; an image cannot be read (named);
            mixed channel counts or sizes (two files named); bad ``resize`` or ``n``.
    """
    root = Path(path)
    size = _resize(resize)
    classes, files = _listing(root)
    count = _first(n, len(files), str(root))
    arrays: list[np.ndarray] = []
    first: tuple[Path, str, tuple[int, int]] | None = None
    for file, _ in files[:count]:
        kind, hw, pixels = _read(file, size)
        if first is None:
            first = (file, kind, hw)
        _same(first, (file, kind, hw), resized=size is not None)
        arrays.append(pixels)
    x = np.stack(arrays)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    y = torch.tensor([label for _, label in files[:count]], dtype=torch.int64)
    return _images(torch.from_numpy(x).float().div_(255.0), y, classes, str(root))


def _resize(resize: Any) -> tuple[int, int] | None:
    if resize is None:
        return None
    if isinstance(resize, (str, bytes)) or not isinstance(resize, Sequence) or len(resize) != 2:
        raise ValueError(f"resize must be (H, W), two positive integers in pixels, got {resize!r}")
    return positive_int(resize[0], "resize H"), positive_int(resize[1], "resize W")


def _listing(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Sorted class names and ``(file, label)`` of every image, in reading order."""
    if not root.exists():
        raise FileNotFoundError(
            f"{root}: no such folder; pass a folder holding one subfolder "
            "per class (path/<class>/<image>.png)"
        )
    if not root.is_dir():
        raise ValueError(
            f"{root} is a file, not a folder; for an .npz or .safetensors file "
            "of arrays use robustlab.data.from_arrays"
        )
    entries = sorted(e for e in root.iterdir() if not e.name.startswith("."))
    folders = [e for e in entries if e.is_dir()]
    if not entries:
        raise ValueError(
            f"{root} is empty; expected one subfolder per class holding its "
            "images (path/<class>/<image>.png)"
        )
    if not folders:
        shown = ", ".join(e.name for e in entries[:3])
        raise ValueError(
            f"{root} has no class subfolders (found only files: {shown}); put the "
            "images into one subfolder per class, named for the class "
            "(path/<class>/<image>.png)"
        )
    files: list[tuple[Path, int]] = []
    for label, folder in enumerate(folders):
        inside = sorted(e for e in folder.iterdir() if not e.name.startswith("."))
        other = [
            e.name + ("/" if e.is_dir() else "")
            for e in inside
            if e.is_dir() or e.suffix.lower() not in IMAGE_SUFFIXES
        ]
        if other:
            raise ValueError(
                f"class folder {folder} holds {len(other)} entries that are not images "
                f"({', '.join(other[:3])}); only {' '.join(IMAGE_SUFFIXES)} files may sit "
                "directly in a class folder: move the others out"
            )
        if not inside:
            raise ValueError(
                f"class folder {folder} holds no images; add images or remove "
                "the folder (an empty class would shift the labels after it)"
            )
        files += [(e, label) for e in inside]
    return [f.name for f in folders], files


def _read(file: Path, size: tuple[int, int] | None) -> tuple[str, tuple[int, int], np.ndarray]:
    """``(kind, (H, W) as stored, uint8 pixels (H, W) or (H, W, 3))`` of one image file,
    kind ``"grayscale"`` or ``"RGB"``, resized to ``size`` if given."""
    kind = out = None
    try:
        with Image.open(file) as im:
            mode, hw = im.mode, (im.height, im.width)
            kind = "grayscale" if mode in _GRAY_MODES else "RGB" if mode in _RGB_MODES else None
            if kind is not None:
                out = im.convert("L" if kind == "grayscale" else "RGB")
                if size is not None:
                    out = out.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"{file}: not a readable image ({err}); replace or remove the file"
        ) from err
    if kind is None or out is None:
        raise ValueError(
            f"{file}: Pillow mode {mode!r} (16- or 32-bit pixels) is not "
            "supported; save the images as 8-bit grayscale or RGB (values 0..255)"
        )
    return kind, hw, np.asarray(out, dtype=np.uint8)


def _same(
    first: tuple[Path, str, tuple[int, int]],
    this: tuple[Path, str, tuple[int, int]],
    *,
    resized: bool,
) -> None:
    """Every image must have the first one's channel count, and its size unless resized."""
    (f0, kind0, hw0), (f1, kind1, hw1) = first, this
    if kind0 != kind1:
        raise ValueError(
            f"the folder mixes grayscale and RGB images: {f0} is {kind0}, {f1} is {kind1}; "
            "a model takes one channel count: convert them all to RGB (Pillow: "
            "Image.open(f).convert('RGB').save(f)) or all to grayscale (.convert('L'))"
        )
    if not resized and hw0 != hw1:
        raise ValueError(
            f"the images have different sizes: {f0} is {hw0[0]}x{hw0[1]} (HxW), {f1} is "
            f"{hw1[0]}x{hw1[1]}; pass resize=(H, W) (CLI: --resize H,W) to resize them all "
            "with Pillow's bilinear filter"
        )


# ---------------------------------------------------------------- array files


def from_arrays(
    source: str | os.PathLike[str] | Mapping[str, Any], *, n: int | None = None
) -> Images:
    """Images and labels from an array file: ``.npz`` or ``.safetensors`` (or a mapping).

    The source holds ``x``, the images, and ``y``, the integer labels ``(N,)`` (any integer
    dtype); other keys are not read, except the optional class names: in an ``.npz`` the
    string array ``classes``, in a ``.safetensors`` file the metadata key ``"classes"`` (a
    JSON list of strings), in a mapping ``classes`` (a sequence of strings).

    ``x`` layout, decided by the channel axis (1 = grayscale, 3 = RGB):
    ``(N, H, W)`` is grayscale; a 4-D ``x`` is ``(N, C, H, W)`` when axis 1 has size 1 or 3,
    else ``(N, H, W, C)`` when axis 3 has size 1 or 3, else an error. The ambiguous case,
    both axes of size 1 or 3 (e.g. ``(N, 3, 32, 3)``), is read as ``(N, C, H, W)``.

    ``x`` values: ``uint8`` 0..255 are divided by 255; floats (``float16``, ``bfloat16``,
    ``float32``, ``float64``) must already lie in [0, 1] and are cast to float32. Other
    dtypes are refused.

    ``.npz`` files are read with ``np.load(path, allow_pickle=False)``: an object array
    (pickled Python objects) is refused, never unpickled.

    Args:
        source: path of an ``.npz`` or ``.safetensors`` file, or a mapping with ``x`` and
            ``y`` (NumPy arrays, tensors or nested lists; copied, never modified).
        n: keep only the first ``n`` images (``1 <= n <= N``), in stored order, not a
            stratified subset; only those are converted and checked. ``None`` keeps all.

    Returns:
        :class:`Images`: ``x`` float32 ``(N, C, H, W)`` in [0, 1] (CPU, or the device of the
        given tensors), ``y`` int64 ``(N,)``, ``classes`` or None, ``source`` the path
        (``"<arrays>"`` for a mapping).

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file and the fix: unsupported file type, unreadable file, an
            object array, ``x`` or ``y`` missing (the keys present are listed), wrong ndim or
            channel axis, unsupported dtype, N of ``x`` and ``y`` differ, NaN/infinite
            values, floats outside [0, 1], labels negative, not integers or out of range of
            ``classes``, bad ``n``.
    """
    name, arrays, classes = _arrays(source)
    for key in ("x", "y"):
        if key not in arrays:
            raise ValueError(
                f"{name}: no array {key!r}; it holds {sorted(arrays) or 'nothing'}"
                "; store the images as 'x' and the labels as 'y'"
            )
    x, y = arrays["x"], arrays["y"]
    _check_dtypes(x, y, name)
    if x.ndim not in (3, 4):
        raise ValueError(
            f"{name}: x must be (N, C, H, W), (N, H, W, C) or (N, H, W), got "
            f"shape {tuple(x.shape)} ({x.ndim} dimensions)"
        )
    if x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[3] not in (1, 3):
        raise ValueError(
            f"{name}: x of shape {tuple(x.shape)} has no channel axis of size 1 (grayscale) "
            "or 3 (RGB) at position 1 (N, C, H, W) or 3 (N, H, W, C); for RGBA drop the "
            "alpha channel (x[..., :3])"
        )
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(
            f"{name}: x holds {len(x)} images but y has shape {tuple(y.shape)}; "
            "y must hold one integer label per image, shape (N,)"
        )
    count = _first(n, len(x), name)
    xt, yt = _tensor(x[:count]), _tensor(y[:count]).long()
    xt = xt.unsqueeze(1) if xt.dim() == 3 else xt
    if xt.shape[1] not in (1, 3):
        xt = xt.permute(0, 3, 1, 2)
    xt = xt.float().div_(255.0) if xt.dtype == torch.uint8 else xt.float()
    return _images(xt, yt, classes, name)


def _dtype(a: Any) -> str:
    return str(a.dtype).removeprefix("torch.") if isinstance(a, Tensor) else a.dtype.name


def _check_dtypes(x: Any, y: Any, name: str) -> None:
    if _dtype(x) not in _X_DTYPES:
        raise ValueError(
            f"{name}: x has dtype {_dtype(x)}, not supported; store 8-bit images as uint8 "
            "(0..255) or images as float32 with values in [0, 1] (e.g. x / 65535 for 16-bit)"
        )
    if _dtype(y) not in _Y_DTYPES:
        raise ValueError(
            f"{name}: y holds {_dtype(y)} values, not integer labels; labels are "
            "class indices: store them as int64 (y.astype(np.int64))"
        )


def _tensor(a: Any) -> Tensor:
    """A fresh tensor holding ``a`` (a tensor, or a NumPy array made native-endian)."""
    if isinstance(a, Tensor):
        return a.detach().clone()
    if a.dtype.name.startswith("uint") and a.dtype.name != "uint8":
        a = a.astype(np.int64)  # labels; torch lacks most unsigned types
    return torch.from_numpy(np.array(a, dtype=a.dtype.newbyteorder("=")))


def _arrays(source: Any) -> tuple[str, dict[str, Any], list[str] | None]:
    """``(name, arrays by key, class names)`` of a source, not yet checked."""
    if isinstance(source, Mapping):
        arrays = {
            k: _plain(v, k) if k in ("x", "y") else None
            for k, v in source.items()
            if k != "classes"
        }
        names = source.get("classes")
        return "<arrays>", arrays, None if names is None else _names(names, "<arrays>")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file; pass an .npz or .safetensors file holding x and y"
        )
    suffix = path.suffix.lower()
    if path.is_dir() or suffix not in (".npz", ".safetensors"):
        what = "a folder" if path.is_dir() else f"a {suffix or 'suffix-less'} file"
        raise ValueError(
            f"{path} is {what}; from_arrays reads .npz or .safetensors files holding x and y "
            "(for a folder of images use robustlab.data.from_folder; a .pt/.pth file: save "
            "its tensors with numpy.savez or safetensors first)"
        )
    return (_npz if suffix == ".npz" else _safetensors)(path)


def _plain(value: Any, key: str) -> Any:
    """A tensor as is, anything else as a NumPy array that holds no Python objects."""
    if isinstance(value, Tensor):
        return value
    try:
        a = np.asarray(value)
    except ValueError as err:  # ragged nested lists
        raise ValueError(
            f"<arrays>: {key!r} is not a rectangular array ({err}); pass one NumPy array or tensor"
        ) from None
    if a.dtype.hasobject:
        raise ValueError(f"<arrays>: {key!r} is an object array; {_PICKLE_FIX}")
    return a


def _npz(path: Path) -> tuple[str, dict[str, Any], list[str] | None]:
    try:
        f = np.load(path, allow_pickle=False)
    except _NPZ_ERRORS as err:
        raise _npz_error(path, "the file", err) from err
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path}: a single .npy array, not an .npz archive; write the images "
            "and labels with numpy.savez(path, x=x, y=y)"
        )
    with f:
        arrays = {
            k: _npz_member(f, k, path) if k in ("x", "y", "classes") else None for k in f.files
        }  # other keys: listed in errors, never read
    names = arrays.pop("classes", None)
    return str(path), arrays, None if names is None else _names(names, str(path))


def _npz_member(f: Any, key: str, path: Path) -> np.ndarray:
    try:
        return f[key]
    except _NPZ_ERRORS as err:
        raise _npz_error(path, f"array {key!r}", err) from None


def _npz_error(path: Path, what: str, err: BaseException) -> ValueError:
    if "pickle" in str(err):  # NumPy's refusal of an object array or a pickle file
        return ValueError(f"{path}: {what} holds pickled Python objects, refused; {_PICKLE_FIX}")
    return ValueError(
        f"{path}: {what} is not readable as an .npz archive ({err}); write it "
        "with numpy.savez(path, x=x, y=y)"
    )


def _safetensors(path: Path) -> tuple[str, dict[str, Any], list[str] | None]:
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            arrays = {k: f.get_tensor(k) if k in ("x", "y") else None for k in keys}
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path}: not a readable .safetensors file ({err}); write it with "
            "safetensors.torch.save_file({'x': x, 'y': y}, path)"
        ) from err
    if "classes" not in meta:
        return str(path), arrays, None
    try:
        names = json.loads(meta["classes"])
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: metadata 'classes' is not JSON ({err}); store json.dumps(list_of_names)"
        ) from None
    return str(path), arrays, _names(names, str(path))


def _names(names: Any, name: str) -> list[str]:
    """Class names as a list of strings (bytes decoded as UTF-8)."""
    if isinstance(names, np.ndarray):
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise ValueError(
                f"{name}: classes must be a 1-D string array, got dtype "
                f"{names.dtype} shape {names.shape}; save np.array(list_of_names)"
            )
        names = [v.decode() if isinstance(v, bytes) else str(v) for v in names.tolist()]
    if (
        isinstance(names, str)
        or not isinstance(names, Sequence)
        or not all(isinstance(v, str) for v in names)
    ):
        raise ValueError(
            f"{name}: classes must be a list of strings, one name per class, got {names!r:.80}"
        )
    return list(names)
