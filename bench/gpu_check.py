"""CUDA-path check: a real training run with AMP, step throughput fp32 vs AMP, scoring speed.

Needs only torch, torchvision and scikit-learn (no Ray/Optuna), so it runs on a bare
GPU box:  python bench/gpu_check.py [--smoke]   (--smoke: tiny sizes, any device).
Prints one JSON line per measurement; ratios within one run are what to compare.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from densitune.search.ood.densities import create_density  # noqa: E402
from densitune.search.ood.scores import create_score  # noqa: E402
from densitune.trainables.nets.backbones import SpectralConfig, create_model  # noqa: E402
from densitune.trainables.nets.losses import create_loss  # noqa: E402
from densitune.trainables.train.config import TrainConfig  # noqa: E402
from densitune.trainables.train.loop import fit, train_step  # noqa: E402


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up (cuDNN autotune, allocator)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def train_steps(backbone: str, device, batch: int, amp: bool, repeats: int) -> float:
    """Images/s of training steps (forward, contrastive center loss, backward, SGD) at 32x32x3."""
    torch.manual_seed(0)
    model = create_model(backbone, in_channels=3, image_size=32, num_classes=10, feature_dim=512,
                         mean=(0.5,) * 3, std=(0.25,) * 3, spectral=SpectralConfig()).to(device)
    loss_fn = create_loss("contrastive", num_classes=10, feature_dim=512).to(device)
    opt = torch.optim.SGD([*model.parameters(), *loss_fn.parameters()], lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        train_step(model, loss_fn, opt, scaler, x, y, amp and device.type == "cuda")

    return batch / timed(step, device, repeats)


def scoring(device, n_train: int, n_query: int, dim: int, batch: int, repeats: int) -> dict:
    """Density fit / score throughput and input-perturbation (ip) scoring of 32x32 images."""
    torch.manual_seed(0)
    z = torch.randn(n_train, dim, device=device)
    y = torch.randint(0, 10, (n_train,), device=device)
    out = {}
    for name in ("gmm_sum", "kde"):
        t0 = time.perf_counter()
        dens = create_density(name).fit(z, y)
        sync(device)
        out[f"{name}_fit_s"] = time.perf_counter() - t0
        q = torch.randn(n_query, dim, device=device)
        out[f"{name}_score_per_s"] = n_query / timed(lambda dens=dens, q=q: dens.score_samples(q), device, repeats)
    model = create_model("resnet18", in_channels=3, image_size=32, num_classes=10, feature_dim=dim,
                         mean=(0.5,) * 3, std=(0.25,) * 3, spectral=SpectralConfig()).to(device).eval()
    gmm = create_density("gmm_sum").fit(z, y)
    score = create_score("density", [model], gmm)
    x = torch.rand(batch, 3, 32, 32, device=device)
    for eps in (0.0, 0.002):
        out[f"resnet18_density_eps{eps}_img_per_s"] = batch / timed(lambda eps=eps: score.evaluate(x, eps), device, repeats)
    return out


def cache_round_trip(device, tmp: Path) -> dict:
    """A search trial on the GPU, then the same trial in a fresh workspace reading the disk cache.

    Checks that cached densities come back on the scoring device and give identical numbers.
    """
    from densitune.search.evaluate import Workspace
    from densitune.search.prepare import prepare_search
    from densitune.search.space import TrialParams
    from densitune.search.trial import run_trial
    from densitune.trainables.train.checkpoint import save_checkpoint

    cfg = TrainConfig(backbone="cnn", feature_dim=16, epochs=3)
    *_, st = fit(cfg, device=device)
    save_checkpoint(tmp / "models" / cfg.key, config=cfg, model=st.model, loss=st.loss, data=st.data, epoch=3, metrics=st.metrics)
    spec, (group,) = prepare_search(dict(models=str(tmp / "models"), experiment="gpu", val_ood="digits-blend",
                                         test_ood=["noise-uniform"], densities=["kde"], attacks=["pgd"], attack_eps=0.1))
    out = {}
    for density in ("gmm_sum", "kde"):
        p = TrialParams(group.key, "density", density, eps=0.01)
        a, rows_a = run_trial(Workspace(device, cache_dir=tmp / "cache"), spec, group, p, "a")
        b, rows_b = run_trial(Workspace(device, cache_dir=tmp / "cache"), spec, group, p, "b")
        out[density] = {"objective": a, "same_after_cache": a == b and [r["auroc"] for r in rows_a] == [r["auroc"] for r in rows_b]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    emit(check="device", device=str(device), torch=torch.__version__,
         name=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu")

    # 1. The real training loop (AMP + GradScaler on CUDA) on the embedded digits.
    t0 = time.perf_counter()
    states = list(fit(TrainConfig(backbone="resnet18", feature_dim=32, epochs=2 if args.smoke else 5, loss="contrastive"), device=device))
    emit(check="fit_resnet18_digits", device=str(device), seconds=round(time.perf_counter() - t0, 2),
         val_accuracy=states[-1].val_accuracy, train_loss=states[-1].train_loss,
         finite=all(torch.isfinite(p).all().item() for p in states[-1].model.parameters()))

    # 2. Training-step throughput, fp32 vs AMP.
    batch, repeats = (8, 2) if args.smoke else (256, 20)
    for backbone in (("cnn", "resnet18") if args.smoke else ("resnet18", "resnet50", "wrn28_10", "vit")):
        fp32 = train_steps(backbone, device, batch, False, repeats)
        amp = train_steps(backbone, device, batch, True, repeats)
        emit(check="train_step", backbone=backbone, batch=batch, fp32_img_per_s=round(fp32, 1),
             amp_img_per_s=round(amp, 1), amp_speedup=round(amp / fp32, 2))

    # 3. Scoring speed (and, on a GPU box, the same on its CPU for the ratio).
    sizes = dict(n_train=500, n_query=500, dim=32, batch=8, repeats=2) if args.smoke else \
        dict(n_train=50_000, n_query=10_000, dim=512, batch=512, repeats=5)
    res = scoring(device, **sizes)
    emit(check="scoring", device=str(device), **{k: round(v, 3) for k, v in res.items()}, **sizes)
    import tempfile

    emit(check="cache_round_trip", device=str(device), **cache_round_trip(device, Path(tempfile.mkdtemp())))
    if device.type == "cuda":
        cpu = scoring(torch.device("cpu"), **{**sizes, "n_train": 10_000, "n_query": 2_000, "batch": 64, "repeats": 2})
        emit(check="scoring", device="cpu", **{k: round(v, 3) for k, v in cpu.items()})


if __name__ == "__main__":
    main()
