"""Image classifiers taking inputs in [0, 1], with normalisation as their first layer.

>>> from robustlab import models
>>> m = models.create("smallcnn", num_classes=10, in_channels=1, input_size=28)
>>> models.names()
['ibp-small', 'lenet', 'preact-resnet18', 'resnet20', 'smallcnn', 'wrn-34-10']

Checkpoints are safetensors plus a JSON sidecar (:func:`save`, :func:`load`); nothing is
ever unpickled. The registry also holds the image-to-image ``"dncnn"`` denoiser of denoised
smoothing (:mod:`robustlab.models.dncnn`), so that it is saved and loaded the same way;
:func:`names` lists the classifiers only.

How to add a model: write an ``nn.Module`` in a file of its own here, decorated with
``@MODELS.register("name")`` (from :mod:`robustlab.models.factory`), whose ``__init__`` takes
the common arguments ``num_classes, in_channels, input_size, activation, mean, std`` followed
by its own JSON-able options with defaults; make ``Normalize(mean, std, channels=in_channels)``
its first layer and build activations with ``make_activation(activation)``
(:mod:`robustlab.models.layers`); import the file below so that it registers. ``create`` then
validates the common arguments, records the build recipe for checkpoints, and the model tests
(parametrised over :func:`names`) cover it. A model imports nothing above ``robustlab.models``
(no attacks, defenses or training).

Any other classifier: :func:`from_spec` builds ``NAME`` from ``"net.py:NAME"`` or
``"package.module:NAME"``, with safetensors weights (``.pt`` files from elsewhere are
converted once by :func:`convert_weights`, through PyTorch's restricted loader) and an
optional normalisation (:class:`Normalized`); :func:`save` stores it, :func:`load` rebuilds
it with ``trust_code=True``; :func:`check_model_fits` tries it on the data before attacks.

>>> model = models.from_spec("net.py:Net", weights="net.safetensors",  # doctest: +SKIP
...                          normalize="0.4914,0.4822,0.4465/0.2471,0.2435,0.2616", width=64)
"""

from robustlab.models import autoencoder, dncnn, ibp_cnn, lenet, resnet, smallcnn, wideresnet  # noqa: F401  (registration)
from robustlab.models.checkpoint import load, save
from robustlab.models.convert import convert_weights
from robustlab.models.factory import create, names
from robustlab.models.features import capture, feature_module
from robustlab.models.layers import ACTIVATIONS, Normalize, Normalized
from robustlab.models.spec import check_model_fits, from_spec, parse_normalize
from robustlab.models.zoo import pretrained, zoo_names

__all__ = [
    "Normalize",
    "Normalized",
    "activations",
    "capture",
    "check_model_fits",
    "convert_weights",
    "create",
    "feature_module",
    "from_spec",
    "load",
    "names",
    "parse_normalize",
    "pretrained",
    "save",
    "zoo_names",
]


def activations() -> list[str]:
    """Names accepted by ``create(..., activation=...)``."""
    return ACTIVATIONS.names()
