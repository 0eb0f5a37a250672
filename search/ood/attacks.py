"""L-infinity adversarial attacks on a classifier, for adversarial-example detection (research note §1.9).

Every attack maximises the cross-entropy of the model's logits on the *true* labels inside the L-infinity ball of
radius ``eps`` around the clean input, intersected with the valid pixel box [0, 1]:

- ``fgsm``: the fast gradient sign method (Goodfellow, Shlens & Szegedy, 2015, "Explaining and harnessing
  adversarial examples"): one step x_adv = clip_[0,1](x + eps * sign(grad_x CE(f(x), y))).
- ``bim``: the basic iterative method (Kurakin, Goodfellow & Bengio, 2017, "Adversarial examples in the physical
  world"): starting at x_0 = x, ``steps`` times x_{t+1} = clip_[0,1](clip_{x,eps}(x_t + alpha * sign(grad CE))).
- ``pgd``: projected gradient descent (Madry et al., 2018, "Towards deep learning models resistant to adversarial
  attacks"): the same iteration from a uniform random start x_0 = clip_[0,1](x + U(-eps, eps)).

Inputs live in [0, 1] pixel space (the models of :mod:`densitune.trainables.nets.backbones` normalise internally), so ``eps`` and
the step size ``alpha`` are in pixel units, e.g. 8/255. The default ``alpha = 2.5 * eps / steps`` is Madry et al.'s
choice; it lets an iterate cross the whole ball and still correct itself. (Kurakin et al. use
``alpha = 1/255`` and ``min(eps*255 + 4, 1.25*eps*255)`` steps; pass ``step_size``/``steps`` for that.)

The attack code never writes ``.grad``: gradients are taken with :func:`torch.autograd.grad` w.r.t. the input only,
so model parameter gradients are untouched. The model is attacked in eval mode (batch-norm running statistics,
no dropout: each sample is attacked independently of its batch) and every module's train/eval flag is restored
afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from densitune.checks import INTEGER, Interval, check_params
from densitune.errors import ConfigError
from densitune.registry import Registry

__all__ = ["ATTACKS", "AttackConfig", "AttackFn", "attack", "attack_dataset", "attack_names"]


@dataclass(frozen=True)
class AttackConfig:
    """Budget and schedule of an L-infinity attack.

    Attributes:
        eps: L-infinity radius in [0, 1] pixel units; finite and > 0.
        steps: iterations of BIM / PGD, >= 1; FGSM always takes exactly one step of size ``eps``.
        step_size: alpha of BIM / PGD in pixel units (> 0); ``None`` means ``2.5 * eps / steps`` (Madry et al., 2018).
        seed: seeds PGD's random start (a CPU :class:`torch.Generator`, so the start is the same on every device).

    Raises:
        ConfigError: on any invalid value.
    """

    eps: float = 8 / 255
    steps: int = 10
    step_size: float | None = None
    seed: int = 0

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "eps": [Interval(float, 0, None, closed="neither")],
        "steps": [Interval(int, 1, None)],
        "step_size": [Interval(float, 0, None, closed="neither"), None],
        "seed": [INTEGER],
    }

    def __post_init__(self) -> None:
        check_params(vars(self), self._parameter_constraints, prefix="attack ")

    @property
    def alpha(self) -> float:
        """The BIM / PGD step size: ``step_size``, or ``2.5 * eps / steps`` when that is ``None``."""
        return float(self.step_size) if self.step_size is not None else 2.5 * self.eps / self.steps


class AttackFn(Protocol):
    """An attack: ``fn(model, x, y, config, generator) -> x_adv``.

    Called by :func:`attack` with the model already in eval mode and gradients enabled; ``x`` (N, C, H, W) is a
    detached tensor in [0, 1], ``y`` (N,) int64 labels on the same device, ``generator`` a seeded CPU generator for
    any randomness. Returns the detached (N, C, H, W) adversarial inputs within the eps-ball and [0, 1].
    """

    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, config: AttackConfig, generator: torch.Generator
    ) -> Tensor: ...


#: name -> :class:`AttackFn`: "fgsm", "bim", "pgd".
ATTACKS: Registry[AttackFn] = Registry("attack")


def attack_names() -> list[str]:
    """Sorted names of the registered attacks."""
    return ATTACKS.names()


# --------------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------------


def _loss_grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """grad_x of the summed cross-entropy, (N, C, H, W).

    The sum (not the mean) makes each sample's gradient its own CE gradient, independent of the batch size, and
    keeps small per-sample gradients from underflowing to zero (which would give sign 0: no move) in big batches.
    """
    leaf = x.detach().requires_grad_(True)
    logits = model(leaf)
    if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"model must return (N, K) logits for {x.shape[0]} inputs, got shape {tuple(logits.shape)}")
    loss = F.cross_entropy(logits.float(), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad


def _project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Project onto {|x_adv - x|_inf <= eps} intersected with [0, 1] (non-empty since x is in [0, 1])."""
    return torch.clamp(torch.minimum(torch.maximum(x_adv, x - eps), x + eps), 0.0, 1.0)


def _iterate(model: nn.Module, x: Tensor, y: Tensor, start: Tensor, config: AttackConfig) -> Tensor:
    """``config.steps`` projected signed-gradient ascent steps of size ``config.alpha`` from ``start``."""
    x_adv = start
    for _ in range(config.steps):
        x_adv = _project(x_adv + config.alpha * _loss_grad(model, x_adv, y).sign(), x, config.eps)
    return x_adv.detach()


# --------------------------------------------------------------------------------------------------------------------
# The attacks
# --------------------------------------------------------------------------------------------------------------------


@ATTACKS.register("fgsm")
def fgsm(model: nn.Module, x: Tensor, y: Tensor, config: AttackConfig, generator: torch.Generator) -> Tensor:
    """FGSM (Goodfellow et al., 2015): x_adv = clip_[0,1](x + eps * sign(grad_x CE(f(x), y))), (N, C, H, W).

    ``steps``, ``step_size`` and ``generator`` are ignored. Elements whose gradient is exactly 0 do not move.
    """
    return _project(x + config.eps * _loss_grad(model, x, y).sign(), x, config.eps).detach()


@ATTACKS.register("bim")
def bim(model: nn.Module, x: Tensor, y: Tensor, config: AttackConfig, generator: torch.Generator) -> Tensor:
    """BIM / I-FGSM (Kurakin et al., 2017): ``steps`` projected steps of size alpha from x itself, (N, C, H, W).

    Departure: alpha defaults to Madry et al.'s ``2.5 * eps / steps`` rather than Kurakin et al.'s 1/255, so that
    BIM and PGD differ only in the random start. ``generator`` is ignored.
    """
    return _iterate(model, x, y, x, config)


@ATTACKS.register("pgd")
def pgd(model: nn.Module, x: Tensor, y: Tensor, config: AttackConfig, generator: torch.Generator) -> Tensor:
    """PGD (Madry et al., 2018): BIM from a uniform random start in the eps-ball, (N, C, H, W).

    The start x_0 = clip_[0,1](x + U(-eps, eps)) is drawn on the CPU from ``generator`` and then moved to
    ``x.device``, so it is the same on every device for the same seed.
    """
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    start = _project(x + (2 * noise - 1) * config.eps, x, config.eps)
    return _iterate(model, x, y, start, config)


# --------------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------------


def _run(name: str, model: nn.Module, x: Tensor, y: Tensor, config: AttackConfig, generator: torch.Generator) -> Tensor:
    """Validate, put the model in eval mode, attack, and restore every module's mode."""
    fn = ATTACKS.get(name)
    if not isinstance(config, AttackConfig):
        raise ConfigError(f"config must be an AttackConfig, got {type(config).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"inputs must be floating point, got {x.dtype}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise ValueError("inputs must lie in [0, 1] pixel space (the model normalises internally)")
    if x.shape[0] == 0:
        return x.detach().clone()
    if (y < 0).any():
        raise ValueError("labels must be >= 0 (unlabelled items, y = -1, cannot be attacked)")
    x = x.detach()
    y = y.detach().to(device=x.device, dtype=torch.long)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            x_adv = fn(model, x, y, config, generator)
    finally:
        for m, training in modes:
            m.training = training
    return x_adv.detach()


def attack(name: str, model: nn.Module, x: Tensor, y: Tensor, config: AttackConfig) -> Tensor:
    """Adversarial examples for a batch under the L-infinity attack ``name``.

    Args:
        name: a registered attack ("fgsm", "bim", "pgd").
        model: maps (N, C, H, W) inputs in [0, 1] to (N, K) logits; attacked in eval mode, modes restored after.
        x: (N, C, H, W) clean inputs in [0, 1] on the model's device.
        y: (N,) true integer labels in [0, K).
        config: the budget; PGD's random start is seeded from ``config.seed``.

    Returns:
        (N, C, H, W) detached adversarial inputs, same dtype and device as ``x``, with
        ``|x_adv - x| <= eps`` elementwise and ``0 <= x_adv <= 1``. Deterministic for a given config
        (up to the determinism of the model's kernels on the device).

    Raises:
        UnknownNameError: ``name`` is not registered (the message lists the known attacks).
        ConfigError: ``config`` is not an :class:`AttackConfig`.
        ValueError: ``x`` outside [0, 1], not floating point, or labels of the wrong shape or negative.
    """
    return _run(name, model, x, y, config, torch.Generator().manual_seed(config.seed))


def attack_dataset(
    name: str,
    model: nn.Module,
    data: Dataset[tuple[Tensor, int]],
    config: AttackConfig,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Attack every item of a labelled data set, in order.

    One seeded generator serves all batches in turn (batch b's PGD start continues the random stream of batch b-1,
    rather than repeating batch 0's noise).

    Args:
        name: a registered attack.
        model: as for :func:`attack`; it is not moved.
        data: a map-style data set of ``(x (C, H, W) in [0, 1], y int)`` pairs.
        config: the attack budget.
        batch_size: items per attacked batch, >= 1.
        device: where to attack; ``None`` means the device of the model's first parameter (CPU without any).

    Returns:
        ``(x_adv, y)``: (N, C, H, W) adversarial inputs and (N,) int64 labels, both on the CPU, in data set order.

    Raises:
        UnknownNameError, ConfigError, ValueError: as for :func:`attack`; ConfigError also for ``batch_size < 1``;
        ValueError for an empty data set.
    """
    ATTACKS.get(name)  # fail on an unknown name before any work
    check_params({"batch_size": batch_size}, {"batch_size": [Interval(int, 1, None)]})
    if len(data) == 0:  # type: ignore[arg-type]
        raise ValueError("cannot attack an empty data set")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    generator = torch.Generator().manual_seed(config.seed)
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
        x_adv = _run(name, model, x.to(device), y.to(device), config, generator)
        xs.append(x_adv.cpu())
        ys.append(torch.as_tensor(y, dtype=torch.long).cpu())
    return torch.cat(xs), torch.cat(ys)
