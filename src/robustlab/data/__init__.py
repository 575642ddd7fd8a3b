"""Data sets as tensors: float32 NCHW images in [0, 1] and int64 labels.

>>> from robustlab import data
>>> data.names()
['cifar10', 'cifar100', 'fashion-mnist', 'mnist', 'svhn']
>>> x, y = data.load("fashion-mnist", split="test")  # doctest: +SKIP

Files are looked for locally first (``root``, ``$ROBUSTLAB_DATA``, Debian's
``dataset-fashion-mnist``, ``~/.cache/robustlab``) and downloaded, SHA-256 checked, only when
absent; see ``robustlab.data.sources``.
"""

from robustlab.data.datasets import DatasetInfo
from robustlab.data.loader import info, load, names

__all__ = ["DatasetInfo", "info", "load", "names"]
