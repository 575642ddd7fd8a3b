"""MagNet (Meng & Chen 2017): the autoencoder of the paper, its noisy-reconstruction training,
and the detector + reformer against the paper's definitions on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import robustlab as rl
from robustlab.defenses.magnet import MagNet, jensen_shannon
from robustlab.models.autoencoder import MagNetAutoencoder, load_autoencoder
from robustlab.training.autoencoder import WEIGHTS_FILE, train_autoencoder


class Masked(nn.Module):
    """A fixed toy autoencoder ``ae(x) = x * mask + offset``: the reconstruction error is
    ``mean |x (1 - mask) - offset|^p``, known in closed form."""

    def __init__(self, mask: torch.Tensor, offset: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask + self.offset


def _mask(size: int = 16) -> torch.Tensor:
    mask = torch.ones(1, 1, size, size)
    mask[..., : size // 2] = 0.0  # the left half is lost
    return mask


@pytest.mark.parametrize("p", [1, 2])
def test_error_score_is_the_mean_pth_power_of_the_reconstruction_error(toy_model, toy_data, p):
    x = toy_data[0][:16]
    magnet = MagNet(toy_model, autoencoder=Masked(_mask(), offset=0.05), p=p)
    xn = x.numpy().astype(np.float64)
    diff = xn * (1 - _mask().numpy()) - 0.05  # x - ae(x)
    expected = (np.abs(diff) ** p).reshape(len(x), -1).mean(1)
    np.testing.assert_allclose(magnet.score(x).detach().numpy(), expected, rtol=1e-5)
    # the identity reconstructs exactly: score 0; a constant offset c: score |c|^p
    assert float(MagNet(toy_model, nn.Identity(), p=p).score(x).abs().max()) == 0.0
    const = MagNet(toy_model, Masked(torch.ones(1), offset=0.1), p=p).score(x)
    torch.testing.assert_close(const, torch.full((16,), 0.1**p), rtol=1e-4, atol=0)


def test_jsd_score_against_a_numpy_computation(toy_model, toy_data):
    x = toy_data[0][:8]
    ae = Masked(_mask())
    magnet = MagNet(toy_model, ae, measure="jsd", temperature=4.0)
    with torch.no_grad():
        a = toy_model(x).double().numpy() / 4.0
        b = toy_model(ae(x).clamp(0, 1)).double().numpy() / 4.0
    pa = np.exp(a - a.max(1, keepdims=True))
    pa /= pa.sum(1, keepdims=True)
    pb = np.exp(b - b.max(1, keepdims=True))
    pb /= pb.sum(1, keepdims=True)
    m = (pa + pb) / 2
    expected = 0.5 * ((pa * np.log(pa / m)).sum(1) + (pb * np.log(pb / m)).sum(1))
    got = magnet.score(x).detach().double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    assert expected.max() > 1e-3  # the mask moves the predictions: a non-trivial case
    # its bounds: 0 for equal distributions, log 2 for disjoint ones
    z = torch.tensor([[50.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(jensen_shannon(z, z, 1.0), torch.zeros(2))
    far = jensen_shannon(torch.tensor([[100.0, 0.0]]), torch.tensor([[0.0, 100.0]]), 1.0)
    torch.testing.assert_close(far, torch.tensor([np.log(2)], dtype=torch.float32))


def test_reformer_logits_are_the_classifier_on_the_reconstruction(toy_model, toy_data):
    x = toy_data[0][:32]
    ae = Masked(_mask(), offset=0.0)
    magnet = MagNet(toy_model, ae, p=1).fit(toy_data[0][64:])
    with torch.no_grad():
        out = magnet(x)
        assert torch.equal(out[:, :-1], toy_model(ae(x)))
        assert not torch.allclose(out[:, :-1], toy_model(x))  # the reformer changed something
        detected = magnet.detect(x)
        assert torch.equal(out.argmax(1) == out.shape[1] - 1, detected)
        plain = MagNet(toy_model, ae, p=1, reform=False, threshold=magnet.threshold)(x)
        assert torch.equal(plain[:, :-1], toy_model(x))
        # a separate reformer: the classifier sees it, the detector keeps its autoencoder
        other = nn.Identity()
        split = MagNet(toy_model, ae, p=1, reformer=other, threshold=magnet.threshold)(x)
        assert torch.equal(split[:, :-1], toy_model(x))
        assert torch.equal(split.argmax(1) == split.shape[1] - 1, detected)


def test_fit_sets_the_threshold_at_the_false_positive_rate(toy_model, toy_data):
    clean = toy_data[0][:100]
    magnet = MagNet(toy_model, Masked(_mask()), p=2, fpr=0.1).fit(clean)
    assert magnet.fit_samples == 100 and magnet.fitted
    assert int(magnet.detect(clean).sum()) <= 10
    scores = magnet.scores(clean).sort().values
    assert magnet.threshold == float(scores[89])  # the ceil(100 * 0.9)-th smallest


def test_autoencoder_has_the_papers_layers():
    one = MagNetAutoencoder(pool=True)
    convs = [m for m in one.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == (
        [(1, 3, (3, 3))] + [(3, 3, (3, 3))] * 3 + [(3, 1, (3, 3))]
    )
    assert sum(isinstance(m, nn.AvgPool2d) for m in one.modules()) == 1
    assert sum(isinstance(m, nn.Sigmoid) for m in one.modules()) == 5
    two = MagNetAutoencoder(pool=False)
    assert sum(isinstance(m, nn.Conv2d) for m in two.modules()) == 3
    assert not any(isinstance(m, nn.AvgPool2d) for m in two.modules())
    x = torch.rand(2, 1, 28, 28)
    for ae in (one, two):
        out = ae(x)
        assert out.shape == x.shape and out.min() > 0 and out.max() < 1
    with pytest.raises(ValueError, match="even H and W"):
        one(torch.rand(1, 1, 7, 7))
    assert "magnet-ae" not in rl.models.names()  # not a classifier


def test_training_reduces_the_reconstruction_error_and_resumes(toy_data, tmp_path):
    x = toy_data[0][:128]
    torch.manual_seed(0)
    ae = MagNetAutoencoder(width=3, pool=False)
    with torch.no_grad():
        before = float(((ae(x) - x) ** 2).mean())
    history = train_autoencoder(ae, x, epochs=8, batch_size=16, lr=0.02, out=tmp_path / "a")
    with torch.no_grad():
        after = float(((ae(x) - x) ** 2).mean())
    assert history[-1]["loss"] < history[0]["loss"] and after < 0.5 * before
    # interrupted after 3 epochs and resumed: the same weights as the uninterrupted run
    torch.manual_seed(0)
    resumed = MagNetAutoencoder(width=3, pool=False)
    train_autoencoder(resumed, x, epochs=3, batch_size=16, lr=0.02, out=tmp_path / "b")
    train_autoencoder(resumed, x, epochs=8, batch_size=16, lr=0.02, out=tmp_path / "b")
    for a, b in zip(ae.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    loaded = load_autoencoder(tmp_path / "a" / WEIGHTS_FILE)
    assert loaded.robustlab_meta["epoch"] == 8 and loaded.robustlab_meta["noise"] == 0.1
    with pytest.raises(ValueError, match="settings differ"):
        train_autoencoder(
            resumed, x, epochs=9, batch_size=16, lr=0.02, noise=0.2, out=tmp_path / "b"
        )


def test_magnet_takes_a_checkpoint_path(toy_model, toy_data, tmp_path):
    ae = MagNetAutoencoder(width=2)
    rl.models.save(ae, tmp_path / "ae.safetensors")
    magnet = rl.defenses.create("magnet", toy_model, autoencoder=str(tmp_path / "ae.safetensors"))
    x = toy_data[0][:4]
    torch.testing.assert_close(magnet.score(x), MagNet(toy_model, ae).score(x))
    assert magnet.config()["autoencoder"]["name"] == "magnet-ae"


@pytest.mark.parametrize("options", [{"p": 2}, {"p": 1}, {"measure": "jsd", "temperature": 3.0}])
def test_score_is_differentiable(options):
    torch.manual_seed(0)
    f = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()
    ae = MagNetAutoencoder(width=2, pool=True).double()
    magnet = MagNet(f, ae, **options)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(magnet.score, (x,))


def test_bad_options_are_named():
    f = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="valid ps"):
        MagNet(f, nn.Identity(), p=3)
    with pytest.raises(ValueError, match="valid measures"):
        MagNet(f, nn.Identity(), measure="l2")
    with pytest.raises(TypeError, match="autoencoder must be an nn.Module"):
        MagNet(f, autoencoder=3)
    with pytest.raises(ValueError, match="temperature"):
        MagNet(f, nn.Identity(), measure="jsd", temperature=0)
