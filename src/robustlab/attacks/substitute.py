"""Substitute-model attack (Papernot, McDaniel, Goodfellow, Jha, Celik, Swami, AsiaCCS 2017,
"Practical Black-Box Attacks against Machine Learning", https://arxiv.org/abs/1602.02697): a
substitute trained on the attacked model's hard labels, its training set grown by
Jacobian-based dataset augmentation; adversarial examples crafted on the substitute with a
white-box attack are replayed on the attacked model (:class:`~robustlab.attacks.transfer.
Transfer` does the replay).

Distance: any norm the inner attack supports. Decision-based: the attacked model is only
queried for its argmax label, under ``torch.no_grad``.
"""

from __future__ import annotations

import copy
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab._modes import eval_mode
from robustlab._validate import (
    check_images,
    check_logits,
    number,
    one_of,
    positive_int,
    probe_model,
)
from robustlab.attacks.base import Attack, Perturbation
from robustlab.attacks.registry import register
from robustlab.attacks.transfer import Transfer
from robustlab.threat import ThreatModel

_HIDDEN = (200, 200)  # the reference's substitute: an MLP 200-200 (cleverhans mnist_blackbox)


class Trained(NamedTuple):
    """A trained substitute and the set it was trained on: ``points`` (M, ...) and the
    attacked model's labels for them (M,), one query each."""

    model: nn.Module
    points: Tensor
    labels: Tensor


def default_substitute(x: Tensor, num_classes: int, generator: torch.Generator) -> nn.Module:
    """The reference's substitute for inputs like ``x``: flatten, Linear-ReLU 200, Linear-ReLU
    200, Linear ``num_classes``, on ``x``'s device and dtype; weights and biases drawn from
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default) with ``generator`` only."""
    sizes = (x[0].numel(), *_HIDDEN, num_classes)
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in zip(sizes, sizes[1:], strict=False):
        lin = nn.utils.skip_init(nn.Linear, fan_in, fan_out, device=x.device, dtype=x.dtype)
        with torch.no_grad():
            for p in lin.parameters():
                u = torch.rand(p.shape, generator=generator, device=generator.device)
                p.copy_((2 * u - 1) / math.sqrt(fan_in))
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def oracle_labels(model: nn.Module, x: Tensor, batch_size: int) -> tuple[Tensor, int]:
    """The attacked model's argmax labels (M,) for ``x`` (M, ...), one query per row, in
    batches of ``batch_size``, under ``torch.no_grad``; and its number of outputs."""
    with torch.no_grad():
        logits = [check_logits(model(b), len(b)) for b in x.split(batch_size)]
    return torch.cat([z.argmax(1) for z in logits]), logits[0].shape[1]


def jacobian_augmentation(
    substitute: nn.Module,
    x: Tensor,
    labels: Tensor,
    step: float,
    bounds: tuple[float, float],
    batch_size: int,
) -> Tensor:
    """The paper's new points ``clip(x + step * sign(d softmax(F(x))_label / dx))`` (M, ...):
    the sign of the gradient of the substitute's probability of the oracle's label, in input
    units, clipped to ``bounds``. Only the input gradient is taken (``torch.autograd.grad``)."""
    out = []
    for xb, yb in zip(x.split(batch_size), labels.split(batch_size), strict=True):
        xb = xb.detach().requires_grad_(True)
        with torch.enable_grad():
            prob = substitute(xb).softmax(1).gather(1, yb[:, None]).sum()
            (grad,) = torch.autograd.grad(prob, xb)
        out.append((xb.detach() + step * grad.sign()).clamp(*bounds))
    return torch.cat(out)


@register("substitute")
class Substitute(Attack):
    """Train a substitute on the attacked model's labels, then transfer an attack from it.

    Round rho = 0 .. R-1: label the new points of S_rho by querying the attacked model (argmax
    only), train the substitute F ``epochs`` epochs on (S_rho, labels) with cross-entropy,
    then (except after the last round) augment S_{rho+1} = S_rho U {clip(x + lambda_rho *
    sign(d F_{O(x)}(x) / dx))}, F's softmax output for the oracle label O(x)
    (:func:`jacobian_augmentation`). The step's sign flips every ``tau`` rounds, starting
    towards the boundary: lambda_rho = -lmbda * (-1)^floor(rho / tau). The substitute keeps
    its weights across rounds. Finally the inner attack runs on F and its points are replayed
    on the attacked model (:class:`~robustlab.attacks.transfer.Transfer`).

    Args:
        threat: threat model (any norm the inner attack supports).
        substitute: the substitute's architecture, an untrained ``nn.Module`` with the attacked
            model's inputs and number of outputs; deep-copied at each call (the caller's module
            is never trained), its parameters trained. Default None: the reference's MLP
            200-200 (:func:`default_substitute`), drawn from the call's generator.
        seed_data: the initial set S_0 (M, ...) of unlabelled inputs in the threat bounds, of
            ``x``'s dtype and per-sample shape; default None: the attacked points themselves
            (the paper: 150 held-out test images).
        rounds: R, substitute training rounds (>= 1). Default 6.
        epochs: training epochs per round (>= 1). Default 10.
        lmbda: augmentation step lambda in input units (> 0). Default 0.1.
        tau: rounds between sign flips of the step (>= 1). Default 3.
        max_new: at most this many new points per augmentation, drawn at random from S_rho
            (a cap on queries); default None: every point, so the set doubles each round.
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9). Default ``"adam"``.
        lr: learning rate (> 0). Default 1e-3.
        batch_size: training batch and query batch (>= 1). Default 128.
        attack, attack_options: the inner attack and its options, as for ``transfer``
            (default PGD, 40 steps, 1 restart).
        targeted: craft towards ``target`` on the substitute.
        seed: seed of the generator when the call passes none.

    Shapes: x (N, ...), as the attacked model takes. Returns ``Perturbation(x_adv,
    queries=...)``: ``queries`` (N,) sums to every query the attack makes: the labels of the
    final training set (|S_{R-1}| = M * 2^(R-1) without ``max_new``), shared in equal integer
    shares among the N samples (the first ``total mod N`` get one more), plus 1 for each
    sample's replay. The two-sample probe of :meth:`Attack.__call__` is not counted.

    Cost: |S_{R-1}| label queries and N replay queries of the attacked model; R * ``epochs``
    epochs of substitute training on sets of M * 2^rho points; one substitute forward and
    backward per point per augmentation; then the inner attack on the substitute.

    Differences from the reference (cleverhans ``mnist_blackbox.py``, the defaults above are
    its own): augmented points are clipped to the threat bounds (cleverhans does not clip);
    one optimiser is kept across rounds; the paper's periodic step starts with +lambda,
    cleverhans (followed here) with -lambda for three rounds and +lambda after, which is this
    rule for R <= 2 * tau; ``max_new`` replaces the paper's reservoir sampling; the default
    inner attack is PGD (FGSM in the paper: ``attack="fgsm"``).

    Example:
        >>> atk = Substitute(ThreatModel("linf", 0.3), seed_data=x_held_out)
        >>> res = atk(model, x, y); res.queries.sum()
    """

    uses_gradients = False
    stochastic = True

    def __init__(
        self,
        threat: ThreatModel,
        *,
        substitute: nn.Module | None = None,
        seed_data: Tensor | None = None,
        rounds: int = 6,
        epochs: int = 10,
        lmbda: float = 0.1,
        tau: int = 3,
        max_new: int | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        batch_size: int = 128,
        attack: str = "pgd",
        attack_options: dict[str, Any] | None = None,
        targeted: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, targeted=targeted, seed=seed)
        if substitute is not None and not isinstance(substitute, nn.Module):
            raise TypeError(
                f"substitute must be an untrained torch.nn.Module (or None for the "
                f"default MLP), got {type(substitute).__name__}"
            )
        if seed_data is not None:
            try:
                check_images(seed_data, threat)
            except (TypeError, ValueError) as err:
                raise type(err)(f"seed_data: {err}") from None
            seed_data = seed_data.detach().clone()
        if attack == "substitute":
            raise ValueError(
                "attack must be the name of a white-box attack to run on the "
                "substitute (e.g. 'pgd' or 'fgsm'), not 'substitute'"
            )
        self.substitute, self.seed_data = substitute, seed_data
        self.rounds, self.epochs = positive_int(rounds, "rounds"), positive_int(epochs, "epochs")
        self.lmbda = number(lmbda, "lmbda", low=0, low_open=True)
        self.tau = positive_int(tau, "tau")
        self.max_new = None if max_new is None else positive_int(max_new, "max_new")
        self.optimizer = one_of(optimizer, "optimizer", ("adam", "sgd"))
        self.lr = number(lr, "lr", low=0, low_open=True)
        self.batch_size = positive_int(batch_size, "batch_size")
        self.attack, self.attack_options = attack, attack_options
        replay = self._replay(nn.Identity())  # checks the inner attack and its options now
        self.loss_name, self.loss = replay.loss_name, replay.loss
        self._inner_config = replay.inner.config()

    def config(self) -> dict[str, Any]:
        sub = "mlp-200-200" if self.substitute is None else type(self.substitute).__name__
        return super().config() | {
            "substitute": sub,
            "seed_data": None if self.seed_data is None else len(self.seed_data),
            "rounds": self.rounds,
            "epochs": self.epochs,
            "lmbda": self.lmbda,
            "tau": self.tau,
            "max_new": self.max_new,
            "optimizer": self.optimizer,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "attack": self._inner_config,
        }

    def _replay(self, surrogate: nn.Module) -> Transfer:
        return Transfer(
            self.threat,
            surrogate=surrogate,
            attack=self.attack,
            attack_options=self.attack_options,
            targeted=self.targeted,
        )

    def _initial_set(self, x: Tensor) -> Tensor:
        if self.seed_data is None:
            return x.detach()
        s = self.seed_data.to(x.device)
        if s.dtype != x.dtype or s.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"seed_data of shape {tuple(s.shape)} and dtype {s.dtype} does not "
                f"match x (N, {', '.join(map(str, x.shape[1:]))}) of dtype "
                f"{x.dtype}: pass seed points shaped and typed like the inputs"
            )
        return s

    def _train(
        self,
        sub: nn.Module,
        opt: torch.optim.Optimizer,
        s: Tensor,
        labels: Tensor,
        generator: torch.Generator,
    ) -> None:
        """``epochs`` epochs of cross-entropy on (s, labels), batches shuffled by ``generator``;
        gradients of the substitute's parameters only, through ``torch.autograd.grad``."""
        params = [p for p in sub.parameters() if p.requires_grad]
        sub.train()
        for _ in range(self.epochs):
            order = torch.randperm(len(s), generator=generator, device=generator.device)
            for idx in order.to(s.device).split(self.batch_size):
                with torch.enable_grad():
                    loss = F.cross_entropy(sub(s[idx]), labels[idx])
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                opt.step()
        sub.eval()

    def _fresh(self, s: Tensor, num_classes: int, generator: torch.Generator) -> nn.Module:
        """An untrained substitute for inputs like ``s``: the default MLP, or a deep copy of
        ``substitute`` with every parameter trainable, checked to give ``num_classes``."""
        if self.substitute is None:
            return default_substitute(s, num_classes, generator)
        sub = copy.deepcopy(self.substitute)
        params = list(sub.parameters())
        if not params:
            raise ValueError(
                "the substitute has no parameters to train: pass a module with "
                "trainable layers, e.g. nn.Sequential(nn.Flatten(), nn.Linear(d, K))"
            )
        for p in params:
            p.requires_grad_(True)
        k = probe_model(sub, s[:2]).shape[1]
        if k != num_classes:
            raise ValueError(
                f"the substitute returns {k} logits but the attacked model "
                f"{num_classes}: give the substitute {num_classes} outputs"
            )
        return sub

    def fit_substitute(self, model: nn.Module, x: Tensor, generator: torch.Generator) -> Trained:
        """Train a substitute of ``model`` from the initial set (``seed_data``, or ``x``) by
        the rounds of the class docstring; ``model`` is queried for labels only, in eval mode,
        and gets its mode back. Returns the substitute (in eval mode) and its training set."""
        s = self._initial_set(x)
        with eval_mode(model):
            labels, k = oracle_labels(model, s, self.batch_size)
            sub = self._fresh(s, k, generator)
            params = [p for p in sub.parameters() if p.requires_grad]
            opt = (
                torch.optim.Adam(params, lr=self.lr)
                if self.optimizer == "adam"
                else torch.optim.SGD(params, lr=self.lr, momentum=0.9)
            )
            for rho in range(self.rounds):
                self._train(sub, opt, s, labels, generator)
                if rho == self.rounds - 1:
                    break
                pick = torch.arange(len(s), device=s.device)
                if self.max_new is not None and len(s) > self.max_new:
                    order = torch.randperm(len(s), generator=generator, device=generator.device)
                    pick = order[: self.max_new].to(s.device)
                step = -self.lmbda * (-1) ** (rho // self.tau)
                new = jacobian_augmentation(
                    sub, s[pick], labels[pick], step, self.threat.bounds, self.batch_size
                )
                s = torch.cat([s, new])
                labels = torch.cat([labels, oracle_labels(model, new, self.batch_size)[0]])
        return Trained(sub, s, labels)

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> Perturbation:
        trained = self.fit_substitute(model, x, generator)
        out = self._replay(trained.model).perturb(model, x, y, generator)
        n, total = len(x), len(trained.labels)
        share = torch.full((n,), total // n, dtype=torch.long, device=x.device)
        share[: total % n] += 1
        return Perturbation(out.x_adv, queries=share + 1)
