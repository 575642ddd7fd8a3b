"""Data sets as tensors: float32 NCHW images in [0, 1] and int64 labels.

>>> from robustlab import data
>>> data.names()
['cifar10', 'cifar100', 'fashion-mnist', 'mnist', 'svhn']
>>> x, y = data.load("fashion-mnist", split="test")  # doctest: +SKIP

Files are looked for locally first (``root``, ``$ROBUSTLAB_DATA``, Debian's
``dataset-fashion-mnist``, ``~/.cache/robustlab``) and downloaded, SHA-256 checked, only when
absent; see ``robustlab.data.sources``.

The user's own data, checked the same way (see ``robustlab.data.custom``):

>>> images = data.from_folder("my_images/", resize=(32, 32))  # doctest: +SKIP
>>> images = data.from_arrays("test.npz")   # x (N,C,H,W) or (N,H,W,C), y (N,)  # doctest: +SKIP
>>> images.x.shape, images.classes                                        # doctest: +SKIP
"""

from robustlab.data.custom import Images, from_arrays, from_folder
from robustlab.data.datasets import DatasetInfo
from robustlab.data.loader import info, load, names

__all__ = ["DatasetInfo", "Images", "from_arrays", "from_folder", "info", "load", "names"]
