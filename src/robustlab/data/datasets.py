"""The registered data sets: what they are (``DatasetInfo``), their official files, their reader.

SHA-256 digests and sizes (bytes) are those of the files at the official URLs, as published in
tensorflow_datasets' ``url_checksums`` (cifar10, cifar100, mnist, svhn_cropped, fashion_mnist).
MNIST's are those of the original yann.lecun.com files, which the ossci-datasets mirror
(used by torchvision) serves unchanged (same MD5s). Debian's ``dataset-fashion-mnist`` package
re-compresses the four Fashion-MNIST files (no file name in the gzip header, so 23-24 bytes
smaller); their decompressed contents are identical to the official ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from robustlab.data.formats import read_cifar_binary, read_idx_pair, read_svhn_mat
from robustlab.data.sources import Resource
from robustlab.registry import Registry

Reader = Callable[[Sequence[Path], str], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class DatasetInfo:
    """What a data set is: name, number of classes, image shape ``(C, H, W)`` in pixels,
    per-channel mean and standard deviation of the train split in [0, 1] units (for a
    model's ``Normalize`` layer), and the class names in label order.

    ``mirrorable``: a left-right mirror image of an example is an example of the same class,
    so training may flip images horizontally (CIFAR-10/100: yes; digits: no, a mirrored digit
    is another glyph; Fashion-MNIST: no, a mirrored shoe points the other way than every shoe
    of the data set)."""

    name: str
    num_classes: int
    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    mirrorable: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    """A registry entry: the info, the official files of each split, and the function turning
    their local paths into ``(uint8 images NCHW, int64 labels)``."""

    info: DatasetInfo
    files: Mapping[str, tuple[Resource, ...]]
    read: Reader


REGISTRY: Registry[DatasetSpec] = Registry("dataset")

# size in bytes, SHA-256, official URL (the format of tensorflow_datasets' url_checksums)
_CHECKSUMS = """
26421880 3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84 http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz
29515 a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845 http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-labels-idx1-ubyte.gz
4422102 346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073 http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-images-idx3-ubyte.gz
5148 67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5 http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-labels-idx1-ubyte.gz
9912422 440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609 https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz
28881 3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c https://ossci-datasets.s3.amazonaws.com/mnist/train-labels-idx1-ubyte.gz
1648877 8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6 https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz
4542 f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6 https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz
170052171 c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz
168513733 58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz
182040794 435e94d69a87fde4fd4d7f3dd208dfc32cb6ae8af2240d066de1df7508d083b8 http://ufldl.stanford.edu/housenumbers/train_32x32.mat
64275384 cdce80dfb2a2c4c6160906d0bd7c68ec5a99d7ca4831afa54f09182025b6a75b http://ufldl.stanford.edu/housenumbers/test_32x32.mat
"""
_BY_URL = {url: (int(n), sha) for n, sha, url in map(str.split, _CHECKSUMS.strip().splitlines())}


def _resource(url: str, also: tuple[str, ...] = ()) -> Resource:
    size, sha256 = _BY_URL[url]
    return Resource(url.rsplit("/", 1)[1], url, sha256, size, also)


def _add(info: DatasetInfo, files: Mapping[str, tuple[Resource, ...]], read: Reader) -> None:
    REGISTRY.register(info.name)(DatasetSpec(info, files, read))


def _idx_files(base_url: str) -> dict[str, tuple[Resource, ...]]:
    """Train/test resources of an MNIST-style data set; the plain IDX file is accepted too."""
    return {
        split: tuple(
            _resource(f"{base_url}{prefix}-{kind}.gz", also=(f"{prefix}-{kind}",))
            for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
        )
        for split, prefix in (("train", "train"), ("test", "t10k"))
    }


def _read_idx(paths: Sequence[Path], split: str) -> tuple[np.ndarray, np.ndarray]:
    return read_idx_pair(*paths)


def _read_cifar(
    paths: Sequence[Path], split: str, *, members: Mapping[str, tuple[str, ...]], **kwargs: int
) -> tuple[np.ndarray, np.ndarray]:
    return read_cifar_binary(paths[0], members[split], **kwargs)


def _read_svhn(paths: Sequence[Path], split: str) -> tuple[np.ndarray, np.ndarray]:
    return read_svhn_mat(paths[0])


_DIGITS = tuple(str(d) for d in range(10))
_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
_CIFAR100_FINE_LABEL_NAMES = """
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile
cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp
lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree
orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum
rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider
squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train
trout tulip turtle wardrobe whale willow_tree wolf woman worm
"""  # in label order, as in fine_label_names.txt of the binary version
_CIFAR100_CLASSES = tuple(_CIFAR100_FINE_LABEL_NAMES.split())

_add(
    DatasetInfo("fashion-mnist", 10, (1, 28, 28), (0.2860,), (0.3530,), _FASHION_CLASSES),
    _idx_files("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
    _read_idx,
)
_add(
    DatasetInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), _DIGITS),
    _idx_files("https://ossci-datasets.s3.amazonaws.com/mnist/"),
    _read_idx,
)

_CIFAR10 = _resource(
    "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", also=("cifar-10-batches-bin",)
)
_add(
    DatasetInfo(
        name="cifar10",
        num_classes=10,
        shape=(3, 32, 32),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        classes=_CIFAR10_CLASSES,
        mirrorable=True,
    ),
    {"train": (_CIFAR10,), "test": (_CIFAR10,)},
    partial(
        _read_cifar,
        members={
            "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
            "test": ("test_batch.bin",),
        },
        label_bytes=1,
        num_classes=10,
    ),
)

_CIFAR100 = _resource(
    "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", also=("cifar-100-binary",)
)
_add(
    DatasetInfo(
        name="cifar100",
        num_classes=100,
        shape=(3, 32, 32),
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        classes=_CIFAR100_CLASSES,
        mirrorable=True,
    ),
    {"train": (_CIFAR100,), "test": (_CIFAR100,)},
    partial(
        _read_cifar,
        members={"train": ("train.bin",), "test": ("test.bin",)},
        label_bytes=2,  # coarse label, then fine label
        num_classes=100,
    ),
)

_add(
    DatasetInfo(
        "svhn", 10, (3, 32, 32), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), _DIGITS
    ),
    {
        split: (_resource(f"http://ufldl.stanford.edu/housenumbers/{split}_32x32.mat"),)
        for split in ("train", "test")
    },
    _read_svhn,
)
