"""Soft spectral normalisation, as DDU uses it.

DDU (Mukhoti et al., 2021, "Deep Deterministic Uncertainty", reference code omegafragger/DDU, itself after
Behrmann et al., 2019, "Invertible Residual Networks") makes the feature extractor smooth and sensitive by bounding
the spectral norm of every conv and linear weight softly:

    W_eff = W / max(1, sigma(W) / coeff)

so a layer whose largest singular value is already below ``coeff`` is left exactly as it is, and a larger one is
scaled down to ``coeff``. ``sigma`` is estimated by power iteration (Miyato et al., 2018): ``n_power_iterations`` steps
per forward pass in training mode, none in eval mode; the singular-vector estimates ``u`` and ``v`` are buffers, so
they persist between steps and travel in the ``state_dict``.

Implementation: a :mod:`torch.nn.utils.parametrize` parametrization (the modern form of the forward pre-hook that DDU
copied from ``torch.nn.utils.spectral_norm`` 1.6). The raw weight lives at
``module.parametrizations.weight.original``; ``module.weight`` is the normalised one.

Departures from DDU, on purpose:

* Convolutions use the spectral norm of the reshaped weight matrix ``(out, in * kh * kw)`` (Miyato et al.'s convention
  and DDU's own choice for 1x1 convs), not the norm of the convolution operator that DDU computes for k > 1 on a fixed
  input size. The operator norm depends on the input size, which varies here (8, 28, 32 pixels). The matrix norm bounds
  the operator norm only up to a factor ``sqrt(kh * kw)`` (Tsuzuku et al., 2018, "Lipschitz-Margin Training"), so the
  per-layer Lipschitz bound for a 3x3 conv is up to 3x looser than DDU's for the same ``coeff``.
* ``nn.MultiheadAttention``'s packed query/key/value projection (``in_proj_weight``, shape ``(3E, E)``) is a linear
  map that is not an ``nn.Linear``; it is normalised too, as one matrix, so no linear map of a ViT body escapes. Note
  that dot-product attention is not Lipschitz at all (Kim et al., 2021), so this bounds a ViT less than a CNN. In
  training mode PyTorch reads ``in_proj_weight`` twice per forward (fast-path check, then the call), which gives that
  weight two power iterations per forward instead of one.
* At registration, :data:`WARMUP_ITERATIONS` (100) power iterations warm the estimate up
  (``torch.nn.utils.parametrizations.spectral_norm`` does 15); DDU starts from random ``u``, ``v`` and lets training
  converge them.

In eval mode the effective weight is recomputed at every forward (one ``u^T W v`` and one division per layer); wrap
bulk feature extraction in ``torch.nn.utils.parametrize.cached()`` to compute it once per batch loop.

Serialise parametrized models through ``state_dict()``: PyTorch refuses to pickle a parametrized module whole
(``copy.deepcopy`` works).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from densitune.errors import ConfigError

__all__ = [
    "SpectralConfig",
    "SoftSpectralNorm",
    "apply_spectral_norm",
    "spectral_layers",
    "effective_weight",
    "raw_weight",
    "spectral_norm_of",
]

#: Power iterations run once at registration so that the first training step already sees a good sigma estimate.
WARMUP_ITERATIONS = 100

#: (module type, name of the weight tensor to normalise) pairs that :func:`apply_spectral_norm` wraps.
_TARGETS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Conv2d, "weight"),
    (nn.Linear, "weight"),
    (nn.MultiheadAttention, "in_proj_weight"),
)


@dataclass(frozen=True)
class SpectralConfig:
    """Soft spectral normalisation settings (DDU defaults: ``coeff`` 3.0, one power iteration per step).

    Attributes:
        coeff: upper bound on each normalised weight's largest singular value; must be > 0.
        n_power_iterations: power-iteration steps per training forward; must be >= 1.
    """

    coeff: float = 3.0
    n_power_iterations: int = 1

    def __post_init__(self) -> None:
        if not self.coeff > 0:
            raise ConfigError(f"spectral coeff must be > 0, got {self.coeff}")
        if int(self.n_power_iterations) != self.n_power_iterations or self.n_power_iterations < 1:
            raise ConfigError(f"spectral n_power_iterations must be an integer >= 1, got {self.n_power_iterations}")


class SoftSpectralNorm(nn.Module):
    """Parametrization ``W -> W / max(1, sigma(W) / coeff)`` with sigma from power iteration.

    ``W`` of shape ``(out, *rest)`` is viewed as the matrix ``(out, prod(rest))``. Buffers ``_u`` (out,) and
    ``_v`` (prod(rest),) hold the current left/right singular-vector estimates. In training mode each evaluation first
    runs ``n_power_iterations`` steps (without gradient) and updates them in place; in eval mode they are frozen, so
    the effective weight is a pure function of the raw weight and the buffers. As in DDU and Miyato et al. (2018), the
    gradient flows through ``sigma = u^T W v`` with ``u``, ``v`` held constant.
    """

    _u: Tensor
    _v: Tensor

    def __init__(self, weight: Tensor, coeff: float, n_power_iterations: int, eps: float = 1e-12) -> None:
        super().__init__()
        if weight.ndim < 2:
            raise ValueError(f"spectral norm needs a weight with >= 2 dims, got shape {tuple(weight.shape)}")
        self.coeff = float(coeff)
        self.n_power_iterations = int(n_power_iterations)
        self.eps = eps
        mat = self._as_matrix(weight.detach())
        h, w = mat.shape
        # Drawn from the global generator, so a seeded torch gives the same u, v (and the same model).
        u = F.normalize(mat.new_empty(h).normal_(0, 1), dim=0, eps=eps)
        v = F.normalize(mat.new_empty(w).normal_(0, 1), dim=0, eps=eps)
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)
        self._power_iteration(mat, WARMUP_ITERATIONS)

    @staticmethod
    def _as_matrix(weight: Tensor) -> Tensor:
        """``(out, *rest)`` -> ``(out, prod(rest))``; for a conv this is ``(out, in * kh * kw)``."""
        return weight.flatten(1)

    @torch.no_grad()
    def _power_iteration(self, mat: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """``n`` steps from the buffers; returns the new (u, v) as fresh tensors, also copied into the buffers."""
        u, v = self._u, self._v
        for _ in range(n):
            v = F.normalize(mat.t() @ u, dim=0, eps=self.eps)
            u = F.normalize(mat @ v, dim=0, eps=self.eps)
        # In place, so the buffers stay the same tensors (state_dict, DataParallel replicas).
        self._v.copy_(v)
        self._u.copy_(u)
        return u, v

    def sigma(self, weight: Tensor) -> Tensor:
        """Current estimate ``u^T W v`` of the largest singular value of ``weight``; a 0-dim tensor, differentiable in
        ``weight``. Never updates the buffers."""
        # Clones: the buffers may be updated in place later while this graph is still needed for backward.
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        return torch.dot(u, self._as_matrix(weight) @ v)

    def scaled(self, weight: Tensor, *, update: bool) -> Tensor:
        """The effective weight ``W / max(1, sigma / coeff)``, same shape as ``weight``; ``update`` runs the power
        iteration first."""
        if update:
            # One power step per training forward; the fresh (u, v) it returns are never written to again, so
            # sigma can use them as they are (sigma() clones the buffers, which later steps update in place).
            u, v = self._power_iteration(self._as_matrix(weight.detach()), self.n_power_iterations)
            sigma = torch.dot(u, self._as_matrix(weight) @ v)
        else:
            sigma = self.sigma(weight)
        factor = torch.clamp(sigma / self.coeff, min=1.0)
        return weight / factor

    def forward(self, weight: Tensor) -> Tensor:
        return self.scaled(weight, update=self.training)

    def extra_repr(self) -> str:
        return f"coeff={self.coeff}, n_power_iterations={self.n_power_iterations}"


def _norm_of(module: nn.Module) -> tuple[str, SoftSpectralNorm] | None:
    """The (tensor name, parametrization) of a module normalised by :func:`apply_spectral_norm`, else None."""
    if not parametrize.is_parametrized(module):
        return None
    for tensor_name, plist in module.parametrizations.items():  # type: ignore[union-attr, operator]
        for p in plist:
            if isinstance(p, SoftSpectralNorm):
                return tensor_name, p
    return None


def apply_spectral_norm(module: nn.Module, config: SpectralConfig) -> nn.Module:
    """Register :class:`SoftSpectralNorm` on every ``nn.Conv2d`` / ``nn.Linear`` weight (and every
    ``nn.MultiheadAttention.in_proj_weight``) inside ``module``, itself included. Modifies ``module`` in place and
    returns it. Modules already normalised are skipped, so applying twice is harmless.
    """
    for _, sub in list(module.named_modules()):
        for kind, tensor_name in _TARGETS:
            if not isinstance(sub, kind) or _norm_of(sub) is not None:
                continue
            weight = getattr(sub, tensor_name, None)
            if not isinstance(weight, Tensor):
                continue  # e.g. MultiheadAttention with separate q/k/v weights: left raw
            norm = SoftSpectralNorm(weight, config.coeff, config.n_power_iterations)
            # unsafe=True skips the registration-time check, which would call forward() and so run one more power
            # iteration in training mode; the shape/dtype are unchanged by construction.
            parametrize.register_parametrization(sub, tensor_name, norm, unsafe=True)
    return module


def spectral_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` for every module of ``model`` whose weight is soft-spectrally normalised."""
    return [(name, m) for name, m in model.named_modules() if _norm_of(m) is not None]


def _require(module: nn.Module) -> tuple[str, SoftSpectralNorm]:
    found = _norm_of(module)
    if found is None:
        raise ValueError(f"{type(module).__name__} has no soft spectral normalisation")
    return found


def raw_weight(module: nn.Module) -> Tensor:
    """The unnormalised parameter of a normalised module (what the optimiser updates), e.g. ``(out, in, kh, kw)``."""
    tensor_name, _ = _require(module)
    return module.parametrizations[tensor_name].original  # type: ignore[index,union-attr]


@torch.no_grad()
def effective_weight(module: nn.Module) -> Tensor:
    """The weight the module uses in eval mode, ``W / max(1, sigma / coeff)``, same shape as the raw weight.

    Computed from the stored ``u``, ``v`` without running a power iteration, whatever the module's mode, so calling
    it has no side effect.
    """
    tensor_name, norm = _require(module)
    return norm.scaled(raw_weight(module), update=False).detach().clone()


def spectral_norm_of(weight: Tensor) -> Tensor:
    """Exact largest singular value of ``weight`` viewed as ``(out, prod(rest))`` (an SVD; for tests and logging)."""
    return torch.linalg.matrix_norm(weight.detach().flatten(1), ord=2)
