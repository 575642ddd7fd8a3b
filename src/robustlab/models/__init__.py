"""Image classifiers taking inputs in [0, 1], with normalisation as their first layer.

>>> from robustlab import models
>>> m = models.create("smallcnn", num_classes=10, in_channels=1, input_size=28)
>>> models.names()
['lenet', 'preact-resnet18', 'resnet20', 'smallcnn', 'wrn-34-10']

Checkpoints are safetensors plus a JSON sidecar (:func:`save`, :func:`load`); nothing is
ever unpickled.
"""

from robustlab.models import lenet, resnet, smallcnn, wideresnet  # noqa: F401  (registration)
from robustlab.models.checkpoint import load, save
from robustlab.models.factory import create, names
from robustlab.models.layers import ACTIVATIONS, Normalize

__all__ = ["Normalize", "activations", "create", "load", "names", "save"]


def activations() -> list[str]:
    """Names accepted by ``create(..., activation=...)``."""
    return ACTIVATIONS.names()
