"""CUDA-path check: a real training run, training-step throughput per backbone (fp32 / bf16 / bf16 + compile),
scoring speed, and a search trial whose cached density is reloaded on the GPU.

Needs only torch, torchvision and scikit-learn (no Ray/Optuna), so it runs on a bare GPU box:

    python bench/gpu_check.py              # on a GPU: the whole check, < 10 minutes
    python bench/gpu_check.py --smoke      # tiny sizes, any device
    python bench/gpu_check.py --cpu-smoke  # tiny sizes on the CPU (what the test suite runs)

Prints one JSON line per measurement; ratios within one run are what to compare. Without a GPU (and
without a smoke flag) it prints one line saying so and exits 0. Training steps run as
:func:`densitune.trainables.train.loop.fit` runs them: channels-last on CUDA, bf16 autocast without a
gradient scaler, and ``torch.compile`` of the step's forward for at most two backbones; every row says
which (``autocast``, ``compile``, ``channels_last``). On CUDA it records (``bench/_harness.py``) the bf16 training
throughput of ResNet-18 and ResNet-50 (the faster of eager and compiled) and the slowest backbone's bf16 / fp32
ratio against their targets; a smoke run records as "quick". Stdout stays JSON lines only (the harness's summary
goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _fixtures import train_network, untrained_net
from _harness import Bench, mean_time

from densitune.search.ood.densities import create_density
from densitune.search.ood.scores import create_score
from densitune.trainables.nets.losses import create_loss
from densitune.trainables.train.config import TrainConfig
from densitune.trainables.train.loop import amp_dtype, fit, train_step

#: backbones timed, and the (at most two) also timed under torch.compile
BACKBONES = ("resnet18", "resnet50", "wrn28_10", "vgg16", "vit")
COMPILED = ("resnet18", "resnet50")


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int, warmup: int = 1) -> float:
    """Mean seconds per call after ``warmup`` calls (cuDNN autotune, allocator, compilation), synchronised."""
    return mean_time(fn, repeats, warmup, sync=lambda: sync(device))


def train_steps(backbone: str, device: torch.device, batch: int, amp: bool, compiled: bool, repeats: int) -> dict:
    """Images/s of training steps (forward, contrastive center loss, backward, SGD) at 32x32x3, spectral norm on,
    set up as the training loop does on ``device``; and the seconds of the first (compiling) steps."""
    torch.manual_seed(0)
    model = untrained_net(512, backbone=backbone, spectral=True, device=device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = create_loss("contrastive", num_classes=10, feature_dim=512).to(device)
    opt = torch.optim.SGD([*model.parameters(), *loss_fn.parameters()], lr=0.01, momentum=0.9)
    dtype = amp_dtype(amp, device)
    forward = torch.compile(model.features_and_logits) if compiled else model.features_and_logits
    x = torch.rand(batch, 3, 32, 32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    model.train()

    def step():
        train_step(model, loss_fn, opt, x, y, dtype, forward=forward)

    t0 = time.perf_counter()
    for _ in range(3 if compiled else 1):
        step()
    sync(device)
    warm_s = time.perf_counter() - t0
    return {"img_per_s": round(batch / timed(step, device, repeats, warmup=0), 1), "warmup_s": round(warm_s, 2),
            "autocast": dtype is not None, "amp_dtype": str(dtype).removeprefix("torch.") if dtype else None,
            "compile": compiled, "channels_last": channels_last}


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
    model = untrained_net(dim, backbone="resnet18", spectral=True, device=device).eval()
    gmm = create_density("gmm_sum").fit(z, y)
    score = create_score("density", [model], gmm)
    x = torch.rand(batch, 3, 32, 32, device=device)
    for eps in (0.0, 0.002):
        out[f"resnet18_density_eps{eps}_img_per_s"] = batch / timed(lambda eps=eps: score.evaluate(x, eps), device, repeats)
    return out


def cache_round_trip(device, tmp: Path, epochs: int = 3) -> dict:
    """A search trial on the GPU, then the same trial in a fresh workspace reading the disk cache.

    Checks that cached densities come back on the scoring device and give identical numbers.
    """
    from densitune.search.evaluate import Workspace
    from densitune.search.prepare import prepare_search
    from densitune.search.space import TrialParams
    from densitune.search.trial import run_trial

    train_network(tmp / "models", device=device, backbone="cnn", feature_dim=16, epochs=epochs)
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, on whatever device there is")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (the test suite runs this)")
    args = ap.parse_args()
    smoke = args.smoke or args.cpu_smoke
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    bench = Bench("gpu_check", quick=smoke)
    emit(check="device", device=str(device), torch=torch.__version__,
         name=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", machine=bench.machine)
    if device.type != "cuda" and not smoke:
        print("gpu_check: no CUDA device here; run it on a GPU machine (or --cpu-smoke for a tiny CPU run)",
              file=sys.stderr)
        return

    # 1. The real training loop (bf16 autocast, channels-last, data kept on the GPU) on the embedded digits.
    t0 = time.perf_counter()
    fit_backbone = "cnn" if args.cpu_smoke else "resnet18"
    states = list(fit(TrainConfig(backbone=fit_backbone, feature_dim=32,
                                  epochs=1 if args.cpu_smoke else 2 if smoke else 5, loss="contrastive",
                                  train_limit=128 if args.cpu_smoke else None), device=device, compile="auto"))
    last = states[-1]
    emit(check="fit_digits", backbone=fit_backbone, device=str(device),
         seconds=round(time.perf_counter() - t0, 2), val_accuracy=last.val_accuracy, train_loss=last.train_loss,
         autocast=last.provenance["autocast"], compile=last.provenance["compile"],
         finite=all(torch.isfinite(p).all().item() for p in last.model.parameters()))

    # 2. Training-step throughput per backbone: fp32, bf16, and bf16 + torch.compile for two backbones.
    batch, repeats = (4, 1) if smoke else (256, 20)
    bf16: dict[str, dict[str, float]] = {}  # backbone -> mode -> img/s
    for backbone in (("cnn", "resnet18") if smoke else BACKBONES):
        runs = {"fp32": train_steps(backbone, device, batch, False, False, repeats)}
        if device.type == "cuda":
            runs["bf16"] = train_steps(backbone, device, batch, True, False, repeats)
            if backbone in COMPILED and not smoke:
                runs["bf16_compile"] = train_steps(backbone, device, batch, True, True, repeats)
        for mode, r in runs.items():
            emit(check="train_step", backbone=backbone, batch=batch, mode=mode, device=str(device), **r,
                 speedup_vs_fp32=round(r["img_per_s"] / runs["fp32"]["img_per_s"], 2))
        bf16[backbone] = {mode: r["img_per_s"] for mode, r in runs.items()}
    if device.type == "cuda":
        for backbone in ("resnet18", "resnet50"):
            if backbone in bf16:
                best = max((m for m in bf16[backbone] if m.startswith("bf16")), key=lambda m: bf16[backbone][m])
                bench.record(f"gpu.{backbone}_bf16_img_s", bf16[backbone][best], note=f"{backbone}: {best}")
        bench.record("gpu.bf16_min_speedup", min(r["bf16"] / r["fp32"] for r in bf16.values()))

    # 3. Scoring speed (and, on a GPU box, the same on its CPU for the ratio).
    sizes = dict(n_train=500, n_query=500, dim=32, batch=8, repeats=2) if smoke else \
        dict(n_train=50_000, n_query=10_000, dim=512, batch=512, repeats=5)
    res = scoring(device, **sizes)
    emit(check="scoring", device=str(device), **{k: round(v, 3) for k, v in res.items()}, **sizes)
    import tempfile

    emit(check="cache_round_trip", device=str(device), **cache_round_trip(device, Path(tempfile.mkdtemp()), 1 if smoke else 3))
    if device.type == "cuda":
        cpu = scoring(torch.device("cpu"), **{**sizes, "n_train": 10_000, "n_query": 2_000, "batch": 64, "repeats": 2})
        emit(check="scoring", device="cpu", **{k: round(v, 3) for k, v in cpu.items()})
    print(bench.summary(), file=sys.stderr)


if __name__ == "__main__":
    main()
