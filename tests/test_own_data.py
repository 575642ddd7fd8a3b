"""The user's own data: ``rl.data.from_folder`` and ``rl.data.from_arrays`` (issue 18, item 3).

Image files are written in ``tmp_path`` with Pillow; every bad input gets its message checked.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from robustlab import data

CLASSES = ["cat", "dog", "eel"]


def _pixels(n: int, channels: int, h: int = 6, w: int = 5, seed: int = 0) -> np.ndarray:
    """uint8 images (n, h, w) or (n, h, w, channels)."""
    shape = (n, h, w) if channels == 1 else (n, h, w, channels)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _folder(root, per_class: int = 2, channels: int = 3, suffix: str = ".png"):
    """A class-per-subfolder tree; returns the uint8 NHWC/NHW images and labels in the
    documented order (classes sorted, files sorted by name)."""
    images = _pixels(per_class * len(CLASSES), channels)
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        # names that sort differently as numbers and as text: img10 before img2
        Image.fromarray(img).save(folder / f"img{10 if i % 2 else 2}{suffix}")
    order = [
        j
        for c in range(len(CLASSES))
        for j in sorted(
            range(c * per_class, (c + 1) * per_class), key=lambda j: f"img{10 if j % 2 else 2}"
        )
    ]
    return images[order], labels[order]


def test_a_folder_and_an_npz_of_the_same_images_give_the_same_tensors(tmp_path):
    pixels, labels = _folder(tmp_path / "imgs")
    np.savez(tmp_path / "a.npz", x=pixels, y=labels, classes=np.array(CLASSES))
    folder = data.from_folder(tmp_path / "imgs")
    arrays = data.from_arrays(tmp_path / "a.npz")
    assert folder.x.shape == (6, 3, 6, 5) and folder.x.dtype == torch.float32
    assert folder.y.dtype == torch.int64 and folder.y.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(folder.x, arrays.x) and torch.equal(folder.y, arrays.y)
    assert folder.classes == arrays.classes == CLASSES
    assert folder.source == str(tmp_path / "imgs") and arrays.source == str(tmp_path / "a.npz")
    expected = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(folder.x, expected)


def test_grayscale_pngs_and_jpegs_stay_one_channel(tmp_path):
    pixels, _ = _folder(tmp_path / "png", channels=1)
    gray = data.from_folder(tmp_path / "png")
    assert gray.x.shape == (6, 1, 6, 5)
    assert torch.equal(gray.x, torch.from_numpy(pixels)[:, None].float() / 255)
    _folder(tmp_path / "jpg", channels=3, suffix=".JPG")
    assert data.from_folder(tmp_path / "jpg").x.shape == (6, 3, 6, 5)


def test_rgba_and_palette_images_are_read_as_rgb(tmp_path):
    rgba = _pixels(1, 4)[0]
    (tmp_path / "a").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a" / "1.png")
    Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "a" / "2.png")
    images = data.from_folder(tmp_path)
    assert images.x.shape == (2, 3, 6, 5)
    assert torch.equal(images.x[0], torch.from_numpy(rgba[..., :3]).permute(2, 0, 1) / 255)


def test_n_takes_the_first_images_in_order_not_a_stratified_subset(tmp_path):
    _folder(tmp_path)
    images = data.from_folder(tmp_path, n=3)
    assert images.y.tolist() == [0, 0, 1] and images.classes == CLASSES
    with pytest.raises(ValueError, match=r"n=7 but .* holds only 6 images"):
        data.from_folder(tmp_path, n=7)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        data.from_folder(tmp_path, n=0)


def test_mixed_sizes_need_resize_and_resize_is_pillow_bilinear(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    small, big = _pixels(1, 3, 4, 4)[0], _pixels(1, 3, 8, 6, seed=1)[0]
    Image.fromarray(small).save(tmp_path / "a" / "s.png")
    Image.fromarray(big).save(tmp_path / "b" / "b.png")
    with pytest.raises(ValueError) as err:
        data.from_folder(tmp_path)
    msg = str(err.value)
    assert "different sizes" in msg and "s.png is 4x4" in msg and "b.png is 8x6" in msg
    assert "resize=(H, W)" in msg and "--resize H,W" in msg
    images = data.from_folder(tmp_path, resize=(5, 7))
    assert images.x.shape == (2, 3, 5, 7)
    want = np.array(Image.fromarray(big).resize((7, 5), Image.Resampling.BILINEAR))
    assert torch.equal(images.x[1], torch.from_numpy(want).permute(2, 0, 1) / 255)
    for bad in ((5,), (0, 3), "5,7", (5.0, 3)):
        with pytest.raises(ValueError, match="resize"):
            data.from_folder(tmp_path, resize=bad)


def test_a_mix_of_grayscale_and_rgb_is_refused_with_both_files_and_the_fix(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(_pixels(1, 1)[0]).save(tmp_path / "a" / "g.png")
    Image.fromarray(_pixels(1, 3)[0]).save(tmp_path / "a" / "h.png")
    with pytest.raises(
        ValueError,
        match=r"mixes grayscale and RGB images: .*g\.png is "
        r"grayscale, .*h\.png is RGB; .*convert\('RGB'\)",
    ):
        data.from_folder(tmp_path)


def test_bad_folders_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        data.from_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="is empty; expected one subfolder per class"):
        data.from_folder(tmp_path)
    Image.fromarray(_pixels(1, 3)[0]).save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match=r"no class subfolders \(found only files: loose.png"):
        data.from_folder(tmp_path)
    with pytest.raises(ValueError, match="is a file, not a folder; .*from_arrays"):
        data.from_folder(tmp_path / "loose.png")
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*a holds no images"):
        data.from_folder(tmp_path)
    (tmp_path / "a" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"holds 1 entries that are not images \(notes.txt\)"):
        data.from_folder(tmp_path)
    (tmp_path / "a" / "notes.txt").unlink()
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"broken\.png: not a readable image"):
        data.from_folder(tmp_path)


def test_hidden_entries_are_ignored(tmp_path):
    _folder(tmp_path)
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0")
    assert data.from_folder(tmp_path).classes == CLASSES


def test_sixteen_bit_images_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(tmp_path / "a" / "d.png")
    with pytest.raises(
        ValueError,
        match=r"d\.png: Pillow mode 'I;16' .* save the images as "
        "8-bit",
    ):
        data.from_folder(tmp_path)


@pytest.mark.parametrize("channels", [1, 3])
def test_nhwc_nchw_and_nhw_layouts_are_equal(tmp_path, channels):
    pixels = _pixels(4, channels)
    nhwc = pixels if channels == 3 else pixels[..., None]
    y = np.arange(4) % 2
    np.savez(tmp_path / "nhwc.npz", x=nhwc, y=y)
    np.savez(tmp_path / "nchw.npz", x=nhwc.transpose(0, 3, 1, 2), y=y)
    a, b = data.from_arrays(tmp_path / "nhwc.npz"), data.from_arrays(tmp_path / "nchw.npz")
    assert a.x.shape == (4, channels, 6, 5) and torch.equal(a.x, b.x)
    if channels == 1:
        np.savez(tmp_path / "nhw.npz", x=pixels, y=y)
        assert torch.equal(data.from_arrays(tmp_path / "nhw.npz").x, a.x)
    assert a.classes is None


def test_the_ambiguous_layout_is_read_as_nchw():
    x = np.zeros((2, 3, 4, 3), dtype=np.uint8)
    x[:, 1] = 255  # channel 1 in NCHW
    images = data.from_arrays({"x": x, "y": [0, 1]})
    assert images.x.shape == (2, 3, 4, 3) and images.x[:, 1].eq(1).all()


def test_uint8_and_float_give_the_same_images(tmp_path):
    pixels = _pixels(3, 3)
    y = np.array([2, 0, 1], dtype=np.uint8)
    a = data.from_arrays({"x": pixels, "y": y})
    b = data.from_arrays({"x": pixels.astype(np.float64) / 255, "y": y.astype(np.int32)})
    c = data.from_arrays({"x": torch.from_numpy(pixels).half() / 255, "y": torch.tensor([2, 0, 1])})
    assert torch.allclose(a.x, b.x, atol=1e-7) and torch.equal(a.y, b.y)
    assert a.y.dtype == torch.int64 and torch.allclose(a.x, c.x, atol=1e-3)
    assert a.source == "<arrays>"


def test_a_mapping_is_copied_not_aliased():
    x = torch.rand(2, 1, 3, 3)
    images = data.from_arrays({"x": x, "y": torch.tensor([0, 1])})
    images.x.zero_()
    assert x.sum() > 0


def test_a_safetensors_file_with_class_names(tmp_path):
    pixels, labels = _folder(tmp_path / "imgs")
    save_file(
        {"x": torch.from_numpy(pixels), "y": torch.from_numpy(labels)},
        str(tmp_path / "a.safetensors"),
        metadata={"classes": json.dumps(CLASSES)},
    )
    save_numpy({"x": pixels.astype(np.float32) / 255, "y": labels}, str(tmp_path / "b.safetensors"))
    a = data.from_arrays(tmp_path / "a.safetensors")
    b = data.from_arrays(tmp_path / "b.safetensors", n=4)
    folder = data.from_folder(tmp_path / "imgs")
    assert torch.equal(a.x, folder.x) and torch.equal(a.y, folder.y) and a.classes == CLASSES
    assert b.classes is None and torch.allclose(b.x, folder.x[:4]) and b.y.tolist() == [0, 0, 1, 1]
    save_file(
        {"x": torch.from_numpy(pixels), "y": torch.from_numpy(labels)},
        str(tmp_path / "c.safetensors"),
        metadata={"classes": "cat,dog"},
    )
    with pytest.raises(ValueError, match="metadata 'classes' is not JSON"):
        data.from_arrays(tmp_path / "c.safetensors")
    (tmp_path / "d.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"d\.safetensors: not a readable \.safetensors file"):
        data.from_arrays(tmp_path / "d.safetensors")


def _npz(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


X, Y = _pixels(3, 3), np.array([0, 1, 2])


@pytest.mark.parametrize(
    "arrays, words",
    [
        ({"images": X, "y": Y}, r"bad\.npz: no array 'x'; it holds \['images', 'y'\]"),
        ({"x": X, "labels": Y}, r"no array 'y'; it holds \['labels', 'x'\]"),
        ({"x": X, "y": Y[:2]}, r"x holds 3 images but y has shape \(2,\); .* one integer label"),
        ({"x": X, "y": Y[:, None]}, r"y has shape \(3, 1\)"),
        (
            {"x": X / 1.0, "y": Y},
            r"x has values in \[0, 255\], outside \[0, 1\]; .* divide 8-bit "
            r"values by 255 .* np\.clip\(x, 0, 1\)",
        ),
        (
            {"x": np.where(X > 100, np.nan, X / 255), "y": Y},
            r"bad\.npz: x contains \d+ NaN or "
            "infinite values",
        ),
        ({"x": np.full(X.shape, np.inf), "y": Y}, "NaN or infinite"),
        ({"x": X, "y": Y - 1}, r"bad\.npz: labels must be >= 0 .* got min label -1"),
        (
            {"x": X, "y": Y + 0.5},
            r"y holds float64 values, not integer labels; .*astype\(np\.int64",
        ),
        ({"x": X, "y": Y > 0}, r"y holds bool values, not integer labels"),
        (
            {"x": X[0, ..., 0], "y": Y},
            r"x must be \(N, C, H, W\), \(N, H, W, C\) or "
            r"\(N, H, W\), got shape \(6, 5\) \(2 dimensions\)",
        ),
        ({"x": X[..., None], "y": Y}, r"5 dimensions"),
        ({"x": np.zeros((3, 4, 6, 6), np.uint8), "y": Y}, r"no channel axis of size 1 .* or 3"),
        (
            {"x": X.astype(np.uint16), "y": Y},
            r"x has dtype uint16, not supported; store 8-bit "
            r"images as uint8 .* float32 with values in \[0, 1\]",
        ),
        ({"x": X.astype(np.int64), "y": Y}, "x has dtype int64, not supported"),
        (
            {"x": X, "y": Y, "classes": np.array(["a", "b"])},
            r"label 2 is out of range for the 2 "
            "class names given",
        ),
        ({"x": X, "y": Y, "classes": np.array([[1, 2, 3]])}, "classes must be a 1-D string array"),
    ],
)
def test_bad_arrays_get_an_error_naming_the_file_and_the_fix(tmp_path, arrays, words):
    path = _npz(tmp_path, **arrays)
    with pytest.raises(ValueError, match=words) as err:
        data.from_arrays(path)
    assert str(err.value).startswith(str(path))


def test_bad_array_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such file; pass an \.npz or \.safetensors"):
        data.from_arrays(tmp_path / "nope.npz")
    (tmp_path / "w.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"is a \.pt file; from_arrays reads \.npz or "):
        data.from_arrays(tmp_path / "w.pt")
    with pytest.raises(ValueError, match="is a folder; .*from_folder"):
        data.from_arrays(tmp_path)
    np.save(tmp_path / "one.npy", X)
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(ValueError, match=r"a single \.npy array, not an \.npz archive"):
        data.from_arrays(tmp_path / "one.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 junk")
    with pytest.raises(ValueError, match=r"junk\.npz: the file is not readable as an \.npz"):
        data.from_arrays(tmp_path / "junk.npz")
    with pytest.raises(ValueError, match=r"<arrays>: no array 'y'; it holds \['x'\]"):
        data.from_arrays({"x": X})
    with pytest.raises(ValueError, match=r"n=4 but .* holds only 3 images"):
        data.from_arrays({"x": X, "y": Y}, n=4)


class Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("key", ["x", "classes"])
def test_a_pickled_object_array_is_refused_and_never_run(tmp_path, key):
    marker = tmp_path / "pwned"
    arrays = {"x": X, "y": Y, "classes": np.array(CLASSES)}
    arrays[key] = np.array([Payload(marker)], dtype=object)
    np.savez(tmp_path / "evil.npz", **arrays)
    with pytest.raises(
        ValueError,
        match=rf"evil\.npz: array '{key}' holds pickled Python "
        r"objects, refused; robustlab "
        "never unpickles",
    ):
        data.from_arrays(tmp_path / "evil.npz")
    assert not marker.exists()
    with np.load(tmp_path / "evil.npz", allow_pickle=True) as f:  # the payload is live
        f[key]
    assert marker.exists()


def test_a_plain_pickle_named_npz_is_refused_and_never_run(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    (tmp_path / "evil.npz").write_bytes(pickle.dumps({"x": Payload(marker)}))
    with pytest.raises(ValueError, match="pickled Python objects"):
        data.from_arrays(tmp_path / "evil.npz")
    assert not marker.exists()


def test_an_object_array_in_a_mapping_is_refused():
    with pytest.raises(ValueError, match=r"<arrays>: 'x' is an object array"):
        data.from_arrays({"x": [{"a": 1}], "y": [0]})
    with pytest.raises(ValueError, match=r"<arrays>: 'x' is not a rectangular array"):
        data.from_arrays({"x": [np.zeros(2), np.zeros(3)], "y": [0, 1]})
