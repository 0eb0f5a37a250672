"""What ``--reproducible`` costs: the same network trained with the CPU's own kernels and with the portable baseline.

Each training runs in a fresh process (the pins must be in the environment before torch loads), alternating the two
settings; the figure is the ratio of the median wall times. It also checks the promise: with the pins, AVX-512 and
AVX2 settings give bit-identical weights.

    python bench/reproducible_cost.py [--epochs 5] [--repeat 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from _harness import Bench, run_process

TRAIN = """
import sys, torch
from densitune.trainables.train.config import TrainConfig
from densitune.trainables.train.loop import fit
*_, last = fit(TrainConfig(backbone="cnn", feature_dim=8, epochs=int(sys.argv[2]), batch_size=64, lr=0.05,
                           dataset="digits", seed=0))
torch.save({k: v.detach().cpu() for k, v in last.model.state_dict().items()}, sys.argv[1])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one epoch, one repeat (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.repeat = 1, 1
    import torch

    from densitune.kernels import PORTABLE_KERNELS

    bench = Bench("reproducible_cost", quick=args.quick)
    base = {k: v for k, v in os.environ.items() if k not in (*PORTABLE_KERNELS, "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    walls: dict[str, list[float]] = {"native": [], "pinned": []}
    with tempfile.TemporaryDirectory() as tmp:
        def train(name: str, env: dict[str, str]) -> dict:
            out = Path(tmp) / f"{name}.pt"
            run = run_process([sys.executable, "-c", TRAIN, str(out), str(args.epochs)], env={**base, **env})
            if run.returncode:
                raise SystemExit(f"{name}: training failed: {run.stderr[-2000:]}")
            walls["pinned" if env else "native"].append(run.wall)
            return torch.load(out, weights_only=True)

        for i in range(args.repeat):
            train(f"native{i}", {})
            train(f"pinned{i}", dict(PORTABLE_KERNELS))
        a = train("pinned-avx512", {"ATEN_CPU_CAPABILITY": "avx512", **PORTABLE_KERNELS})
        b = train("pinned-avx2", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", **PORTABLE_KERNELS})
    native, pinned = statistics.median(walls["native"]), statistics.median(walls["pinned"])
    print(f"training cnn D=8, {args.epochs} epoch(s), {args.repeat} repeat(s): native {native:.1f} s, "
          f"pinned {pinned:.1f} s (medians of wall time, each in a fresh process)")
    bench.record("reproducible.train_slowdown", pinned / native)
    bench.record("reproducible.bit_identical", all(torch.equal(a[k], b[k]) for k in a))
    print(bench.summary())


if __name__ == "__main__":
    main()
