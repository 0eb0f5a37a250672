"""GPU throughputs measured by ``bench/gpu_check.py``, as data for ``densitune run --plan``.

The package never reads ``bench/`` at run time: the figures are copied here, with the card and the
file they come from. Training figures are img/s of one optimiser step (batch 256, 32×32 inputs,
spectral norm on); ``amp`` is what training uses on CUDA (``TrainConfig.amp``, on by default).
Scoring figures are img/s of density scoring with ResNet-18 at D = 512 (ε = 0: one forward pass;
ε > 0: forward, backward, forward); other backbones are scaled by their training throughput.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Throughput:
    """Training step throughput of one backbone on :data:`CARD` (img/s)."""

    fp32: float
    amp: float
    measured: bool = True  # False: not measured; the figure of ``source`` is used instead
    source: str = ""


CARD = "NVIDIA H200"
SOURCE = "bench/results/gpu_check_h200.jsonl (python bench/gpu_check.py)"

TRAIN: dict[str, Throughput] = {
    "resnet18": Throughput(10613.8, 8270.4),
    "resnet50": Throughput(4790.3, 3970.2),
    "wrn28_10": Throughput(3426.2, 5347.7),
    "vit": Throughput(7686.5, 6271.8),
    # Not measured by gpu_check.py: ResNet-18's figures stand in (VGG-16-BN for 32×32 inputs has about
    # half ResNet-18's FLOPs, so this errs on the long side).
    "vgg16": Throughput(10613.8, 8270.4, measured=False, source="resnet18"),
}

#: Density scoring with ResNet-18 at D = 512 (img/s): ε = 0 and ε > 0 (input perturbation).
SCORE_RESNET18 = {"eps0": 62721.01, "ip": 20689.575}


#: Density evaluation alone on features (queries/s), fitted on 50,000 × 512 features: KDE's cost grows with D.
SCORE_DENSITY = {"gmm_sum": 1936136.986, "kde": 326255.092}
DENSITY_DIM = 512


def train_throughput(backbone: str) -> Throughput:
    """The training throughput of ``backbone`` (unmeasured backbones, e.g. ``cnn``: ResNet-18's, flagged)."""
    if backbone in TRAIN:
        return TRAIN[backbone]
    r = TRAIN["resnet18"]
    return Throughput(r.fp32, r.amp, measured=False, source="resnet18")


def score_throughput(backbone: str, ip: bool) -> float:
    """Scoring img/s of ``backbone``: ResNet-18's, scaled by the two backbones' training throughput."""
    scale = train_throughput(backbone).amp / TRAIN["resnet18"].amp
    return SCORE_RESNET18["ip" if ip else "eps0"] * scale
