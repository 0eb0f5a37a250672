"""Scoring kernels against peers and against this machine's limits (CPU; issue 13, item 3).

On the same features, measured in one run:

1. gmm_sum vs pytorch-ood's ``GMM`` / ``Mahalanobis`` and a DDU-style ``torch.distributions.MultivariateNormal``
   reference: AUROC (equal to 1e-4 for the same model) and fit+score time ratios.
2. GMM log-density throughput at D = 2048 as a fraction of the measured float64 GEMM rate, counting 2·N·C·D² flops
   (target >= 70 %); the float32 path's speed-up there.
3. float32 scoring on class covariances with condition numbers ~1e8: AUROC change (gate < 1e-3).
4. KDE vs scikit-learn's KernelDensity at N = 10,000, D = 512: both against an exact scipy ``logsumexp``
   reference (ours: gate 1e-6), speed ratio per core (target >= 40x) and against the bare distance GEMM, peak memory
   at two query counts (bounded by the block buffer, not M x N).
5. ip scoring (x + eps·sign(grad log q), then scoring) vs our own forward pass (target <= 3.5x) and vs pytorch-ood's
   ``MahalanobisODIN`` on the same model (target: faster): counted flops, per-core CPU-time ratios, and each
   convolution's forward vs its input-gradient kernel.

Speed targets are measured as thread CPU time on one torch thread, best of interleaved rounds (``cpu_timed``): other
processes on the machine then change neither side; wall-clock ratios on all threads are printed for information.

    pip install -e ".[bench]" --config-settings editable_mode=strict && python bench/peers.py [STEP ...] [--quick]

``STEP``: only those steps (kde, peers_gmm, gemm_roofline, float32_auroc, ip_scoring). ``--quick``: every step at
small sizes (a smoke run; the figures are no measure). Records peers.kde_max_diff, .kde_speedup,
.float32_auroc_change, .gmm_gemm_fraction, .ip_over_forward and .ip_over_odin (``bench/_harness.py``).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from _fixtures import untrained_net
from _harness import Bench, best_of, describe, peak_rss_mb, reset_peak_rss, rss_mb, thread_cpu_best
from torch.utils._python_dispatch import TorchDispatchMode

from densitune.search.ood.densities import create_density, density_from_state
from densitune.search.ood.metrics import auroc


@dataclass
class Run:
    """This run: its harness records, sizes (``quick``: small ones) and the printed table's rows."""

    bench: Bench
    quick: bool = False
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)  # (what, target, measured, verdict)

    def row(self, what: str, target: str, measured: str, met: bool | None, cause: str = "") -> None:
        verdict = "-" if met is None else "met" if met else f"NOT met: {cause}"
        self.rows.append((what, target, measured, verdict))
        print(f"  {what}: {measured} (target {target}) -> {verdict}", flush=True)


def timed(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    """(best wall time of ``repeat`` runs, last result)."""
    return best_of(fn, repeat)


def class_features(n_per: int, d: int, c: int, seed: int, shift: float = 0.0, full: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(c * n_per, d) float32 features of c Gaussian classes (fixed structure; ``full``: correlated features, else
    independent ones with per-class scales), labels (c * n_per,)."""
    g = torch.Generator().manual_seed(1234)  # the classes' structure: the same for every call
    means = torch.randn(c, d, generator=g) * 2.0
    g.manual_seed(seed)
    noise = torch.randn(c, n_per, d, generator=g)
    if full:
        mix = torch.randn(c, d, d, generator=torch.Generator().manual_seed(99)) / math.sqrt(d)
        noise = torch.einsum("cnd,ced->cne", noise, mix)
    else:
        noise = noise * torch.rand(c, 1, d, generator=torch.Generator().manual_seed(99)).add(0.5)
    z = noise + means.unsqueeze(1) + shift
    return z.reshape(c * n_per, d), torch.arange(c).repeat_interleave(n_per)


# ------------------------------------------------------------------------------------------------ 1. peers


def peers_gmm(run: Run) -> None:
    from pytorch_ood.detector import GMM, Mahalanobis

    print("1. gmm_sum vs pytorch-ood GMM / Mahalanobis and a torch MultivariateNormal reference (C=10, D=128)")
    z, y = class_features(600, 128, 10, seed=0)
    z_id, _ = class_features(200, 128, 10, seed=1)
    z_ood, _ = class_features(200, 128, 10, seed=2, shift=0.04)  # a small shift: a non-trivial AUROC

    def ours() -> tuple[torch.Tensor, torch.Tensor]:
        d = create_density("gmm_sum").fit(z, y)
        return d.score_samples(z_id), d.score_samples(z_ood)

    def pood_gmm() -> tuple[torch.Tensor, torch.Tensor]:
        det = GMM(None, reg=0.0).fit_features(z.double(), y)
        return -det.predict_features(z_id), -det.predict_features(z_ood)  # outlier score -> higher = ID

    def pood_maha() -> tuple[torch.Tensor, torch.Tensor]:
        det = Mahalanobis(None).fit_features(z, y)
        return -det.predict_features(z_id), -det.predict_features(z_ood)

    def mvn() -> tuple[torch.Tensor, torch.Tensor]:  # DDU's gmm_fit / gmm_evaluate, with the class prior
        z64 = z.double()
        mus = torch.stack([z64[y == k].mean(0) for k in range(10)])
        covs = torch.stack([torch.cov(z64[y == k].T) for k in range(10)])
        log_pi = torch.log(torch.bincount(y).double() / len(y))
        dist = torch.distributions.MultivariateNormal(loc=mus, covariance_matrix=covs)
        return tuple(torch.logsumexp(dist.log_prob(q.double()[:, None, :]) + log_pi, 1) for q in (z_id, z_ood))

    t_ours, s_ours = timed(ours)
    a_ours = auroc(*s_ours)
    print(f"  ours gmm_sum: AUROC {a_ours:.6f}, fit+score {t_ours * 1e3:.1f} ms")
    for name, fn, same_model in (("pytorch-ood GMM", pood_gmm, True), ("torch MultivariateNormal (DDU)", mvn, True),
                                 ("pytorch-ood Mahalanobis (tied covariance)", pood_maha, False)):
        t, s = timed(fn)
        a = auroc(*s)
        ratio = t / t_ours
        if same_model:
            run.row(f"{name}: AUROC", f"|diff| <= 1e-4 vs ours {a_ours:.6f}", f"{a:.6f} (diff {abs(a - a_ours):.1e})",
                   abs(a - a_ours) <= 1e-4, "different estimates of the same model")
        else:
            run.row(f"{name}: AUROC", "another model (shared covariance, max over classes): no equality expected",
                   f"{a:.6f} vs ours {a_ours:.6f}", None)
        run.row(f"{name}: time / ours", "report", f"{ratio:.2f}x ({t * 1e3:.1f} ms)", None)


# ------------------------------------------------------------------------------------------------ 2. GEMM roofline


def gemm_roofline(run: Run) -> None:
    print("2. GMM log-density throughput vs this machine's float64 GEMM (D=2048, C=4, N=2048 queries)")
    d, c, n = (256, 4, 256) if run.quick else (2048, 4, 2048)
    a, b = torch.randn(n, d, dtype=torch.float64), torch.randn(d, d, dtype=torch.float64)
    t_gemm, _ = timed(lambda: a @ b, repeat=5)
    gemm = 2 * n * d * d / t_gemm
    z, y = class_features(d + 50, d, c, seed=0, full=False)
    t_fit, dens = timed(lambda: create_density("gmm_sum").fit(z, y), repeat=1)
    q = class_features(n // c, d, c, seed=1, full=False)[0]
    flops = 2 * n * c * d * d
    t64, _ = timed(lambda: dens.score_samples(q))
    d32 = density_from_state({**dens.state_dict(), "params": {**dens.get_params(), "dtype": "float32"}})
    t32, _ = timed(lambda: d32.score_samples(q))
    print(f"  float64 GEMM {gemm / 1e9:.1f} GFLOP/s; fit {t_fit:.2f} s; score {t64:.3f} s float64, {t32:.3f} s float32")
    frac = flops / t64 / gemm
    run.bench.record("peers.gmm_gemm_fraction", frac)
    run.row("GMM float64 throughput / GEMM rate", ">= 70 %", f"{100 * frac:.0f} % ({flops / t64 / 1e9:.1f} GFLOP/s counted)",
           frac >= 0.7, "the triangular solve (TRSM) runs below GEMM speed on this CPU")
    run.row("GMM float32 speed-up over float64", "report (about 2x)", f"{t64 / t32:.2f}x", None)


# ------------------------------------------------------------------------------------------------ 3. float32 path


def float32_auroc(run: Run) -> None:
    print("3. float32 scoring path on class covariances with condition numbers ~1e8 (C=10, D=128)")
    rng = np.random.default_rng(0)
    d, c = 128, 10
    eig = np.logspace(0, -8, d)
    bases = [np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(c)]
    means = rng.standard_normal((c, d)) * 0.05

    def draw(n_per: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
        zs = [means[k] + (rng.standard_normal((n_per, d)) * np.sqrt(eig)) @ bases[k].T
              + shift * bases[k][:, -1] for k in range(c)]
        return torch.tensor(np.concatenate(zs)), torch.arange(c).repeat_interleave(n_per)

    z, y = draw(400, 0.0)
    z_id, z_ood = draw(100, 0.0)[0], draw(100, 3e-4)[0]
    d64 = create_density("gmm_sum").fit(z, y)
    cond = float(torch.linalg.cond(d64.covariances_).min())
    d32 = density_from_state({**d64.state_dict(), "params": {**d64.get_params(), "dtype": "float32"}})
    a64, a32 = auroc(d64.score_samples(z_id), d64.score_samples(z_ood)), auroc(d32.score_samples(z_id), d32.score_samples(z_ood))
    run.bench.record("peers.float32_auroc_change", abs(a32 - a64))
    run.row(f"float32 AUROC change (min class condition number {cond:.1e})", "< 1e-3",
           f"{abs(a32 - a64):.1e} (float64 {a64:.6f}, float32 {a32:.6f})", abs(a32 - a64) < 1e-3, "float32 rounding")


# ------------------------------------------------------------------------------------------------ 4. KDE


def _exact_kde(train: np.ndarray, q: np.ndarray, h: float) -> np.ndarray:
    """The exact Gaussian KDE log-density: scipy ``logsumexp`` over every training row (float64)."""
    from scipy.spatial.distance import cdist
    from scipy.special import logsumexp

    d2 = cdist(q, train, "sqeuclidean")
    n, d = train.shape
    return logsumexp(-d2 / (2 * h * h), axis=1) - math.log(n) - 0.5 * d * math.log(2 * math.pi * h * h)


def cpu_timed(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Best thread CPU time (s) of each function over ``rounds`` interleaved rounds, at one torch thread.

    CPU time of the calling thread does not count the time another process holds the core, so on a shared machine
    this ratio is stable where wall-clock ratios drift with the load (all work runs on the calling thread: one
    torch/MKL/oneDNN thread, and scikit-learn's tree KDE is single-threaded)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return thread_cpu_best(fns, rounds)
    finally:
        torch.set_num_threads(threads)


def kde(run: Run) -> None:
    from sklearn.neighbors import KernelDensity

    from densitune.search.ood.densities import kde as densities

    print("4. KDE vs scikit-learn KernelDensity (N=10,000 training rows, D=512)")
    n, d = (2_000, 128) if run.quick else (10_000, 512)
    train = class_features(n // 10, d, 10, seed=0, full=False)[0].double()
    q = torch.cat([class_features(50, d, 10, seed=1, full=False)[0],  # 1,000 query rows: 500 ID, 500 shifted
                   class_features(50, d, 10, seed=2, shift=0.3, full=False)[0]]).double()
    dens = create_density("kde").fit(train)  # Scott's rule
    h = dens.bandwidth_
    # peak memory above the resident size before scoring, at two query counts (the peak is reset before each; the
    # first call also builds the kept (N, D + 2) training operand)
    peaks = []
    ms = (100, 400) if run.quick else (500, 4000)
    for m in ms:
        qm = class_features(m // 10, d, 10, seed=3, full=False)[0].double()
        reset_peak_rss()
        before = rss_mb()
        dens.score_samples(qm)
        peaks.append(peak_rss_mb() - before)
    ours = dens.score_samples(q)
    ref = _exact_kde(train.numpy(), q.numpy(), h)
    err = float(np.abs(ours.numpy() - ref).max())
    run.row("KDE ours vs exact scipy logsumexp: max |diff|", "<= 1e-6", f"{err:.1e} nats", err <= 1e-6, "rounding")
    run.bench.record("peers.kde_max_diff", err)
    m_sk = 100
    sk = KernelDensity(kernel="gaussian", bandwidth=h).fit(train.numpy())
    sk_out = sk.score_samples(q[:m_sk].numpy())
    sk_err = float(np.abs(sk_out - ref[:m_sk]).max())
    run.row("KDE scikit-learn vs exact: max |diff| (information)", "-", f"{sk_err:.1e} nats", None)
    # the GEMM our blocks run (queries x 512 features x 2048 training rows), alone, to bound ours from below
    qb, tb = q[: densities._KDE_QUERY_ROWS], dens.train_[: densities._KDE_TRAIN_ROWS]
    cpu = cpu_timed({"ours": lambda: dens.score_samples(q), "sklearn": lambda: sk.score_samples(q[:m_sk].numpy()),
                     "gemm": lambda: qb @ tb.mT}, rounds=3)
    per_ours, per_sk = cpu["ours"] / len(q), cpu["sklearn"] / m_sk
    roof = cpu["gemm"] / len(qb) * n / len(tb)  # s per query row at the GEMM's own rate, one thread
    run.bench.record("peers.kde_speedup", per_sk / per_ours)
    run.row("KDE speed vs scikit-learn (per query row, one core each: thread CPU time)", ">= 40x",
           f"{per_sk / per_ours:.0f}x (ours {1e3 * per_ours:.3f} ms/row, sklearn {1e3 * per_sk:.1f} ms/row)",
           per_sk / per_ours >= 40,
           f"float64 distances need 2*N*D flops a row: the GEMM alone takes {1e3 * roof:.3f} ms/row here, "
           f"so at most {per_sk / roof:.0f}x")
    run.row("KDE time / the bare distance GEMM (one thread)", "report (1.0 = GEMM-bound)",
           f"{per_ours / roof:.2f} (GEMM {2 * n * d / roof / 1e9:.0f} GFLOP/s)", None)
    t_wall, _ = timed(lambda: dens.score_samples(q))
    t_sk_wall, _ = timed(lambda: sk.score_samples(q[:m_sk].numpy()), repeat=1)
    run.row(f"KDE speed vs scikit-learn, wall clock, ours on {torch.get_num_threads()} threads (information)", "-",
           f"{(t_sk_wall / m_sk) / (t_wall / len(q)):.0f}x (ours {1e3 * t_wall / len(q):.3f} ms/row, "
           f"sklearn {1e3 * t_sk_wall / m_sk:.1f} ms/row; load-dependent)", None)
    buf = densities._KDE_QUERY_ROWS * densities._KDE_TRAIN_ROWS * 8 / 2**20
    operand = n * (d + 2) * 8 / 2**20  # the (N, D + 2) GEMM operand, built by the first call and kept
    bound = buf + operand + 3 * ms[1] * d * 8 / 2**20  # ... and a few float64 copies of the (ms[1], D) queries
    run.row(f"KDE scoring peak memory growth, {ms[0]:,} vs {ms[1]:,} query rows",
           f"the {buf:.0f} MB block buffer + the {operand:.0f} MB training operand + float64 copies of the queries "
           f"(<= {bound:.0f} MB at {ms[1]:,}), not M x N",
           f"{peaks[0]:.0f} MB vs {peaks[1]:.0f} MB", max(peaks) <= bound + 16, "memory grows with M x N")


# ------------------------------------------------------------------------------------------------ 5. ip


class FlopCount(TorchDispatchMode):
    """Floating-point operations of every aten op with a formula in ``torch.utils.flop_counter`` (convolutions,
    their backward, matmuls), forward and backward, by op name: a count that does not depend on the machine's load.
    (``FlopCounterMode`` itself cannot follow ``torch.autograd.grad``, which our ip calls.)"""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            name = str(func._overloadpacket).removeprefix("aten.")
            self.by_op[name] = self.by_op.get(name, 0) + formula(*args, **kwargs, out_val=out)
        return out


def ip_scoring(run: Run) -> None:
    from pytorch_ood.detector import MahalanobisODIN

    from densitune.search.ood.scores import create_score

    n_x = 128 if run.quick else 512
    print(f"5. ip scoring (cnn backbone, 32x32x3, D=128, {n_x} images, batches of 128, eps=0.002)")
    torch.manual_seed(0)
    model = untrained_net(128).eval()
    x_fit, x = torch.rand(1200, 3, 32, 32), torch.rand(n_x, 3, 32, 32)
    with torch.no_grad():
        z_fit = model.features(x_fit)
    y_fit = torch.arange(10).repeat(120)
    dens = create_density("gmm_sum").fit(z_fit, y_fit)
    score = create_score("density", [model], dens)
    batches = x.split(128)

    def forward() -> None:
        with torch.no_grad():
            for b in batches:
                model.features(b)

    def ours_ip() -> None:
        for b in batches:
            score.evaluate(b, 0.002)

    det = MahalanobisODIN(model.features, eps=0.002).fit_features(z_fit, y_fit)

    def pood() -> None:
        for b in batches:
            det.predict(b)

    # the arithmetic each does, counted (one batch)
    flops = {}
    for name, fn in (("forward", lambda: model.features(batches[0])), ("ours", lambda: score.evaluate(batches[0], 0.002)),
                     ("pood", lambda: det.predict(batches[0]))):
        with FlopCount() as fc:
            fn()
        flops[name] = fc.by_op
        print(f"  GFLOP per batch, {name}: " + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in sorted(fc.by_op.items())))
    model.zero_grad(set_to_none=True)  # MahalanobisODIN's loss.backward() left weight gradients behind
    total = {k: sum(v.values()) for k, v in flops.items()}
    run.row("ip flops / forward flops (counted)", "report (floor: forward + input-gradient backward + forward = 3)",
           f"ours {total['ours'] / total['forward']:.2f}, MahalanobisODIN {total['pood'] / total['forward']:.2f} "
           "(it also computes the weights' gradients)", None)

    # one core each, thread CPU time, interleaved rounds: independent of what else runs on the machine
    cpu = cpu_timed({"forward": forward, "ip": ours_ip, "pood": pood}, rounds=4)
    model.zero_grad(set_to_none=True)
    # per convolution: forward vs the input-gradient (backward-data) kernel the ip backward runs, same flops
    layers, h = [], model.normalize(batches[0])
    with torch.no_grad():
        for m in model.body:
            if isinstance(m, torch.nn.Conv2d):
                g = torch.randn_like(m(h))
                layers.append((m, h, g))
            h = m(h)

    def bwd_data(m: torch.nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> Callable[[], Any]:
        return lambda: torch.ops.aten.convolution_backward(g, a, m.weight, None, m.stride, m.padding, m.dilation,
                                                           False, [0, 0], 1, [True, False, False])

    conv_fns: dict[str, Callable[[], Any]] = {}
    for k, (m, a, g) in enumerate(layers):
        conv_fns[f"fwd{k}"] = lambda m=m, a=a: m(a)
        conv_fns[f"bwd{k}"] = bwd_data(m, a, g)
    with torch.no_grad():
        conv = cpu_timed(conv_fns, rounds=5)
    sum_f = sum(conv[f"fwd{k}"] for k in range(len(layers)))
    sum_b = sum(conv[f"bwd{k}"] for k in range(len(layers)))
    for k, (_, a, g) in enumerate(layers):
        print(f"  conv {tuple(a.shape)} -> {tuple(g.shape)}: forward {1e3 * conv[f'fwd{k}']:.2f} ms, "
              f"input-gradient backward {1e3 * conv[f'bwd{k}']:.2f} ms ({conv[f'bwd{k}'] / conv[f'fwd{k}']:.1f}x, same flops)")
    bwd = cpu["ip"] - 2 * cpu["forward"]
    run.bench.record("peers.ip_over_forward", cpu["ip"] / cpu["forward"])
    run.bench.record("peers.ip_over_odin", cpu["ip"] / cpu["pood"])
    run.row("ip scoring / our forward pass (one core, thread CPU time)", "<= 3.5x",
           f"{cpu['ip'] / cpu['forward']:.2f}x ({len(x) / cpu['ip']:.0f} img/s vs {len(x) / cpu['forward']:.0f})",
           cpu["ip"] / cpu["forward"] <= 3.5,
           f"ip = forward + input-gradient backward + forward, 3.0x the forward's flops; the backward takes "
           f"{bwd / cpu['forward']:.1f} forwards, because oneDNN's backward-data convolutions run "
           f"{sum_b / sum_f:.1f}x slower than the forward ones at equal flops ({1e3 * sum_b:.1f} vs {1e3 * sum_f:.1f} ms "
           "a batch, per layer above), plus batch-norm/ReLU backward")
    run.row("ip scoring / pytorch-ood MahalanobisODIN (one core, thread CPU time)", "< 1 (faster)",
           f"{cpu['ip'] / cpu['pood']:.2f}x ({len(x) / cpu['pood']:.0f} img/s)", cpu["ip"] < cpu["pood"],
           "see the counted flops")
    t_fwd = t_ip = t_pood = math.inf
    for _ in range(2):  # the same on all threads, wall clock: moves with the machine's load
        t_fwd, t_ip, t_pood = min(t_fwd, timed(forward, 1)[0]), min(t_ip, timed(ours_ip, 1)[0]), min(t_pood, timed(pood, 1)[0])
    run.row(f"ip / forward and ip / MahalanobisODIN, wall clock on {torch.get_num_threads()} threads (information)", "-",
           f"{t_ip / t_fwd:.2f}x and {t_ip / t_pood:.2f}x (load-dependent)", None)


def main() -> None:
    steps = {step.__name__: step for step in (kde, peers_gmm, gemm_roofline, float32_auroc, ip_scoring)}
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("steps", nargs="*", metavar="STEP", help=f"only these: {', '.join(steps)}")
    ap.add_argument("--quick", action="store_true", help="every step at small sizes (a smoke run)")
    args = ap.parse_args()
    if unknown := sorted(set(args.steps) - set(steps)):
        ap.error(f"unknown step {', '.join(unknown)} (choose from {', '.join(steps)})")
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    run = Run(Bench("peers", quick=args.quick), quick=args.quick)
    print(f"# peers: {describe(run.bench.machine)}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          "no GPU used")
    for name, step in steps.items():
        if not args.steps or name in args.steps:
            step(run)
    print("\n| what | target | measured | verdict |\n|---|---|---|---|")
    for row in run.rows:
        print("| " + " | ".join(row) + " |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    print(run.bench.summary())


if __name__ == "__main__":
    main()
