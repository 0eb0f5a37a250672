"""Input perturbation ("ip"): one signed-gradient step that raises the in-distribution score.

The research note's Algorithm 1, step 4: x~ = x + eps * sign(grad_x log q(f_theta(x))). It is the same move as
ODIN (Liang et al. 2018, "Enhancing the reliability of out-of-distribution image detection in neural
networks") and the Mahalanobis detector (Lee et al. 2018, "A simple unified framework for detecting
out-of-distribution samples and adversarial attacks"), which step x - eps * sign(grad_x M(x)) against the
Mahalanobis distance M, i.e. towards higher density. In-distribution inputs gain more score than OOD ones.

The score itself is never computed here: the caller passes a differentiable ``score_fn`` (e.g.
``lambda x: density.score_samples(model.features(x))``), so the perturbation cannot drift from the scoring
maths (pytorch-ood computes the Gaussian score twice, once for the step and once for the score).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from densitune.checks import Interval, check_params

__all__ = ["apply_sign", "gradient_sign", "perturb"]


def perturb(x: Tensor, score_fn: Callable[[Tensor], Tensor], eps: float) -> Tensor:
    """Move every input element by ``eps`` in the direction that raises its score.

    x~ = x + eps * sign(d/dx sum_n score_fn(x)_n). Summing is exact per sample as long as ``score_fn``
    treats samples independently (no batch statistics: call the model in eval mode), because then
    d sum_n s_n / d x_n = d s_n / d x_n.

    Conventions:

    - ``eps == 0`` returns ``x`` itself (the same object, bit-identical) without evaluating ``score_fn``,
      so an "eps = 0" trial is exactly the unperturbed baseline.
    - No clamping to the valid pixel range: every element with a non-zero gradient moves by exactly ``eps``
      (in whatever space ``x`` lives, e.g. normalised pixels). ODIN and the Mahalanobis reference code do not
      clamp either. (Lee et al. divide the sign by the per-channel normalisation std so that eps is measured in
      [0, 1] pixel units; to do that, pass ``x`` in pixel space and normalise inside ``score_fn``.)
    - An element whose gradient is exactly zero has sign 0 and does not move.
    - The gradient is taken w.r.t. a detached copy of ``x`` with :func:`torch.autograd.grad`, so no ``.grad``
      is written anywhere: model parameters' ``.grad`` stay as they were and ``x.requires_grad`` is untouched.
      Gradients are enabled for the call even under an outer ``torch.no_grad()``.

    Args:
        x: (N, ...) inputs (floating dtype).
        score_fn: maps (N, ...) inputs to (N,) scores, higher = more in-distribution; must be differentiable.
        eps: step size, >= 0.

    Returns:
        (N, ...) detached perturbed inputs, same dtype and device as ``x`` (``x`` itself when ``eps == 0``).

    Raises:
        ConfigError: ``eps`` is negative or not finite.
        ValueError: ``score_fn`` does not return one score per sample, or its output does not depend
            differentiably on ``x``.
    """
    check_params({"eps": eps}, {"eps": [Interval(float, 0, None)]})
    if eps == 0:
        return x
    return (x.detach() + eps * _gradient(x, score_fn).sign()).detach()


def _gradient(x: Tensor, score_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """d/dx sum_n score_fn(x)_n, (N, ...) like ``x``, detached (see :func:`perturb`)."""
    if not x.is_floating_point():
        raise ValueError(f"inputs must be floating point to be perturbed, got {x.dtype}")
    leaf = x.detach().requires_grad_(True)  # shares storage with x, but is a separate autograd leaf
    with torch.enable_grad():
        scores = score_fn(leaf)
        if scores.ndim != 1 or scores.shape[0] != x.shape[0]:
            raise ValueError(f"score_fn must return ({x.shape[0]},) scores, got shape {tuple(scores.shape)}")
        if not scores.requires_grad:
            raise ValueError("score_fn output does not depend differentiably on its input")
        (grad,) = torch.autograd.grad(scores.sum(), leaf)
    return grad


def gradient_sign(x: Tensor, score_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """sign(d/dx sum_n score_fn(x)_n) as an (N, ...) int8 tensor of -1, 0, 1 (same device as ``x``).

    The direction of :func:`perturb`, which does not depend on ε: computed once, it serves every ε through
    :func:`apply_sign` (``apply_sign(x, gradient_sign(x, f), eps)`` equals ``perturb(x, f, eps)`` bit for bit).
    A NaN gradient element gives 0 here (``perturb`` would move it to NaN).
    """
    return _gradient(x, score_fn).sign().nan_to_num(0.0).to(torch.int8)


def apply_sign(x: Tensor, sign: Tensor, eps: float) -> Tensor:
    """x~ = x + eps * sign: the perturbed inputs (N, ...) from a precomputed (N, ...) ``sign`` (int8 or float).

    ``eps == 0`` returns ``x`` itself, as :func:`perturb` does; same dtype and device as ``x``, detached.
    """
    check_params({"eps": eps}, {"eps": [Interval(float, 0, None)]})
    if eps == 0:
        return x
    if sign.shape != x.shape:
        raise ValueError(f"sign has shape {tuple(sign.shape)}, inputs {tuple(x.shape)}")
    return (x.detach() + eps * sign.to(device=x.device, dtype=x.dtype)).detach()
