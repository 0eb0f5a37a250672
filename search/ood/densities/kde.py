"""Gaussian kernel density estimate, registered as ``kde``."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from densitune.checks import INTEGER, Interval, Options, check_params
from densitune.errors import DensituneError
from densitune.search.ood.densities._base import DENSITIES, Density
from densitune.search.ood.densities._linalg import CHUNK_SIZE, ELEMENT_BUDGET, LOG_2PI, as_features

__all__ = ["GaussianKDE"]

# KDE blocks without autograd: query rows x training rows of one reused float64 GEMM buffer (8 MiB). Measured
# at N = 10,000, D = 512, 1,000 queries, one thread: blocks from 128 x 2048 to 2896 x 2896 all took 0.15-0.17 s
# (the bare GEMM 0.14 s), 64 x 4096 0.21 s; this size keeps the buffer small at no cost in speed.
_KDE_QUERY_ROWS, _KDE_TRAIN_ROWS = 512, 2048


@DENSITIES.register("kde")
class GaussianKDE(Density):
    """Isotropic Gaussian kernel density estimate on the (class-agnostic) training features.

    log q(z) = logsumexp_i(-||z - z_i||^2 / (2 h^2)) - log N - D/2 log(2 pi h^2),

    the same normalised density as ``sklearn.neighbors.KernelDensity(kernel="gaussian", bandwidth=h)``.

    Bandwidth rules (``bandwidth_`` is fitted on the N training rows kept after subsampling):

    - a positive float: h = bandwidth, used as is (on the raw features).
    - ``"scott"``: h = N^(-1/(D+4)) * sigma.
    - ``"silverman"``: h = (N (D+2) / 4)^(-1/(D+4)) * sigma.

    with sigma = sqrt(mean_d Var[z_d]) (per-feature variance with divisor N - 1), the root-mean-square feature
    standard deviation. sklearn uses the same factors *without* sigma, i.e. it assumes standardised data;
    network features are not standardised (their scale depends on the backbone, D and spectral norm), so the
    rules here are scale-aware: on features whose every dimension has unit variance they equal sklearn's
    value, and on isotropic data they equal ``scipy.stats.gaussian_kde``'s kernel width.

    Distances are computed block by block (query rows x train rows, both chunked) and the blocks are combined
    with a logsumexp, so memory is O(chunk^2), never O(M x N); features are centred on the training mean first
    to limit cancellation in ||z||^2 + ||z_i||^2 - 2 z.z_i. Without autograd (the usual scoring call) each block
    is one GEMM into a reused buffer followed by an in-place exp-sum, using -||z - z_i||^2 / (2 h^2) =
    z.z_i / h^2 - ||z_i||^2 / (2 h^2) - ||z||^2 / (2 h^2): the per-training-row bias and each query row's max
    offset ride in the GEMM's operands (a kept (N, D + 2) copy of the training rows), the last term is added once
    per row, and blocks are 512 x 2048 (8 MiB) by default; this runs within ~10 % of the bare float64 GEMM
    (bench/peers.py). A query that requires grad (input perturbation) takes the out-of-place path autograd can
    follow. Both are float64 throughout and equal the exact kernel sum to ~1e-12 nats.

    Args:
        bandwidth: positive float, ``"scott"`` or ``"silverman"``.
        max_train: keep at most this many training rows (uniform subsample without replacement, seeded by
            ``random_state``); ``None`` keeps all. Scoring cost is O(M x N x D).
        random_state: seed of the subsample.
        chunk_size: rows per block for both query and training rows; ``None`` uses 512 query x 2048 training
            rows without autograd and sqrt(2**23) = 2896 for both with it.

    Fitted attributes:
        train_ (N, D) float64 training features (centred), mean_ (D,), bandwidth_ (float), n_train_ (int),
        n_features_in_ = D.
    """

    name = "kde"
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "bandwidth": [Interval(float, 0, None, closed="neither"), Options(("scott", "silverman"))],
        "max_train": [Interval(int, 1, None), None],
        "random_state": [INTEGER],
        "chunk_size": CHUNK_SIZE,
    }

    def __init__(
        self,
        *,
        bandwidth: float | str = "scott",
        max_train: int | None = None,
        random_state: int = 0,
        chunk_size: int | None = None,
    ) -> None:
        check_params({"bandwidth": bandwidth, "max_train": max_train, "random_state": random_state,
                      "chunk_size": chunk_size}, self._parameter_constraints)
        self.bandwidth = bandwidth
        self.max_train = max_train
        self.random_state = random_state
        self.chunk_size = chunk_size

    def get_params(self) -> dict[str, Any]:
        return {
            "bandwidth": self.bandwidth,
            "max_train": self.max_train,
            "random_state": self.random_state,
            "chunk_size": self.chunk_size,
        }

    def fitted_summary(self) -> dict[str, Any]:
        return {"bandwidth_": self.bandwidth_, "n_train_": self.n_train_}

    def fit(self, z: Tensor, y: Tensor | None = None) -> GaussianKDE:
        """Store (a seeded subsample of) the training features and fix ``bandwidth_``; ``y`` is ignored."""
        z64 = as_features(z).detach()
        n, d = z64.shape
        if n == 0:
            raise DensituneError("cannot fit a density on zero samples")
        if self.max_train is not None and n > self.max_train:
            gen = torch.Generator(device="cpu").manual_seed(self.random_state)
            keep = torch.randperm(n, generator=gen)[: self.max_train].sort().values
            z64 = z64[keep.to(z64.device)]
            n = self.max_train
        if isinstance(self.bandwidth, str):
            if n < 2:
                raise DensituneError(f"bandwidth={self.bandwidth!r} needs at least 2 training rows, got {n}")
            sigma = math.sqrt(float(z64.var(dim=0, correction=1).mean()))
            if self.bandwidth == "scott":
                factor = n ** (-1.0 / (d + 4))
            else:
                factor = (n * (d + 2) / 4.0) ** (-1.0 / (d + 4))
            h = factor * sigma
            if not h > 0:
                raise DensituneError("training features have zero variance; use a numeric bandwidth")
        else:
            h = float(self.bandwidth)
        self.mean_ = z64.mean(dim=0)
        self.train_ = z64 - self.mean_
        self.train_sq_ = self.train_.square().sum(dim=1)  # (N,)
        self.bandwidth_ = h
        self.n_train_ = n
        self.n_features_in_ = d
        return self

    def score_samples(self, z: Tensor) -> Tensor:
        """(M, D) -> (M,) float64 log q(z); differentiable w.r.t. ``z``."""
        z64 = self._check_query(z) - self.mean_
        log_norm = -math.log(self.n_train_) - 0.5 * self.n_features_in_ * (LOG_2PI + 2.0 * math.log(self.bandwidth_))
        if not (z64.requires_grad and torch.is_grad_enabled()):
            return self._score_no_grad(z64, log_norm)
        rows = self.chunk_size or math.isqrt(ELEMENT_BUDGET)
        inv_two_h2 = 1.0 / (2.0 * self.bandwidth_**2)
        out = []
        for qs in range(0, z64.shape[0], rows):
            q = z64[qs : qs + rows]  # (m, D)
            q_sq = q.square().sum(dim=1, keepdim=True)  # (m, 1)
            partial = []
            for ts in range(0, self.n_train_, rows):
                t = self.train_[ts : ts + rows]  # (n, D)
                # ||q||^2 + ||t||^2 - 2 q.t in one fused GEMM (addmm): fewer passes over the (m, n) block
                d2 = torch.addmm(q_sq + self.train_sq_[ts : ts + rows], q, t.mT, alpha=-2.0).clamp_min(0.0)  # (m, n)
                partial.append(torch.logsumexp(d2 * -inv_two_h2, dim=1))  # (m,)
            out.append(torch.logsumexp(torch.stack(partial, dim=1), dim=1) + log_norm)
        if not out:
            return z64.new_empty(0)
        return torch.cat(out)

    #: (train_, bandwidth_, their (N, D + 2) GEMM operand): built on the first no-autograd score, never saved
    _gemm_cache: tuple[Tensor, float, Tensor] | None = None

    def _gemm_operand(self) -> Tensor:
        """(N, D + 2) float64 [t_i, -||t_i||^2 / (2 h^2), 1]: the training rows with the kernel's per-row bias and a
        column of ones, so one GEMM with a query block [z / h^2, 1, -offset] gives S - offset with no further pass.
        Kept for the fitted state it was built from (a refit or a loaded state builds it again)."""
        cached = self._gemm_cache
        if cached is None or cached[0] is not self.train_ or cached[1] != self.bandwidth_:
            t = self.train_
            op = t.new_empty(t.shape[0], t.shape[1] + 2)
            op[:, :-2] = t
            op[:, -2] = self.train_sq_ * (-0.5 / self.bandwidth_**2)
            op[:, -1] = 1.0
            self._gemm_cache = cached = (t, self.bandwidth_, op)
        return cached[2]

    @torch.no_grad()
    def _score_no_grad(self, z64: Tensor, log_norm: float) -> Tensor:
        """(M, D) centred float64 queries -> (M,) log q(z): GEMM blocks in one reused (m, n) buffer, exp in place.

        With S_i = z.t_i / h^2 - ||t_i||^2 / (2 h^2), log q = logsumexp_i S_i - ||z||^2 / (2 h^2) + log_norm. Per
        query block, the first training block's S gives each row's offset M (its max there: the largest term is
        exp(0) = 1); every later block's S - M comes out of one GEMM (the offset rides in the operands' extra
        columns) and is exponentiated and summed in place. Terms far below M underflow harmlessly (they are
        < e^-700 of a term already counted); a row whose later block rises so far above M that its sum overflows is
        redone for that block with its own max. Memory: the buffer, m x n float64, and the (N, D + 2) operand.
        """
        m_all, (n_all, d) = z64.shape[0], self.train_.shape
        q_rows = self.chunk_size or _KDE_QUERY_ROWS
        t_rows = self.chunk_size or _KDE_TRAIN_ROWS
        h2 = self.bandwidth_**2
        train = self._gemm_operand()  # (N, D + 2)
        n_blocks = -(-n_all // t_rows)
        buf = z64.new_empty(min(q_rows, m_all) * min(t_rows, n_all))
        out = z64.new_empty(m_all)
        for qs in range(0, m_all, q_rows):
            q = z64[qs : qs + q_rows]  # (m, D)
            m = q.shape[0]
            qa = q.new_empty(m, d + 2)  # [z / h^2, 1, -M]
            torch.mul(q, 1.0 / h2, out=qa[:, :d])
            qa[:, d] = 1.0
            qa[:, d + 1] = 0.0
            partial = z64.new_empty(n_blocks, m)  # (blocks, m): log sum_i exp(S_i - M) of each block
            offset = z64.new_zeros(m)
            for j, ts in enumerate(range(0, n_all, t_rows)):
                t = train[ts : ts + t_rows]  # (n, D + 2)
                n = t.shape[0]
                s = torch.mm(qa, t.mT, out=buf[: m * n].view(m, n))  # (m, n): S - M
                if j == 0:
                    offset = s.amax(dim=1)  # (m,)
                    s.sub_(offset.unsqueeze(1))
                    qa[:, d + 1] = -offset
                torch.sum(s.exp_(), dim=1, out=partial[j])
                partial[j].log_()
                over = torch.isinf(partial[j]) & (partial[j] > 0)
                if bool(over.any()):  # rare: this block lies > ~700 nats above the first one for these rows
                    rows = over.nonzero().squeeze(1)
                    s_over = torch.mm(qa[rows], t.mT)  # (r, n)
                    top = s_over.amax(dim=1, keepdim=True)
                    partial[j, rows] = (s_over - top).exp_().sum(dim=1).log_() + top.squeeze(1)
            out[qs : qs + m] = torch.logsumexp(partial, dim=0) + offset - q.square().sum(dim=1) * (0.5 / h2)
        return out.add_(log_norm)
