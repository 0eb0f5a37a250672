"""Does the peak memory of scoring grow with the batch size and not with the data set? (issue 13, item 6)

Each step of :mod:`densitune.search.scoring` (clean features, density scores at ε = 0, ip scores at ε > 0
on the reference path, the ε cache's gradient signs and its one-forward ip scores) runs at two data-set
sizes and two batch sizes, each configuration in a fresh process. Peak resident memory is Linux's
``VmHWM``, reset before every step (``/proc/self/clear_refs``, after ``malloc_trim``); children run with a fixed glibc mmap threshold (see
``MALLOC_ENV``) so that resident memory follows the live buffers; a step's figure is its peak above the
resident memory before it, minus what the step returns (N feature rows, N scores, or the N int8 signs
the ε cache keeps by design: one byte per input element, a quarter of the float32 inputs already held).

    python bench/scoring_memory.py [--sizes 2000 8000] [--batches 64 512] [--quick]

Prints one JSON line per configuration, then a table and the verdict: working memory grows with the
batch size (≥ 1.5x from the small to the large batch) and not with the data set (≤ 1.25x + 4 MiB from
the small to the large set). Linux only; about a minute on 2 cores. ``--quick``: sizes 256 and 1024, batches 16
and 64 (a smoke run: too small for the verdict to mean anything). Records scoring_memory.grows_with_batch,
.flat_in_n (the gate) and .ip_cached_mib (the cached ip step at the largest size and batch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _fixtures import untrained_net
from _harness import Bench, describe, peak_rss_mb, reset_peak_rss, rss_mb

MiB = 1024 * 1024
#: glibc raises its mmap threshold after every large free, after which big buffers come from the heap and
#: fragment it: resident memory then drifts with the number of batches, not with what is alive. A fixed
#: threshold (glibc's default start value) keeps every buffer of >= 128 KiB an mmap that is returned when freed.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
STEPS = ("features", "density_eps0", "density_ip_reference", "gradient_signs", "density_ip_cached")


def measure(step, returned_bytes) -> dict[str, float]:
    """Run ``step()``; its peak resident memory above the start, and that minus what it returns (MiB)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so a step's reuse of them shows
    reset_peak_rss()  # VmHWM back to the current RSS
    before = rss_mb()
    out = step()
    peak = peak_rss_mb() - before
    return {"peak_mib": peak, "working_mib": peak - returned_bytes(out) / MiB}


def child(n: int, batch: int) -> dict:
    """One configuration, in this (fresh) process."""
    import torch
    from torch.utils.data import TensorDataset

    from densitune.search.ood.densities import create_density
    from densitune.search.ood.scores import create_score
    from densitune.search.scoring import extract_features, gradient_signs, score_inputs, score_signed

    torch.set_num_threads(1)
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = untrained_net(64, spectral=True).eval()
    data = TensorDataset(torch.rand(n, 3, 32, 32), torch.randint(0, 10, (n,)))
    fit_on = torch.randn(2000, 64)
    density = create_density("gmm_sum").fit(fit_on, torch.arange(2000) % 10)
    score = create_score("density", [model], density)
    eps = 0.01
    held: dict = {}

    def features():
        held["f"] = extract_features(model, data, batch, device)
        return held["f"]

    def signs():
        held["s"] = gradient_signs(score, data, batch, device)
        return held["s"]

    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    feature_bytes = lambda f: size(f.z) + size(f.logits) + size(f.y)  # noqa: E731
    steps = {
        "features": (features, feature_bytes),
        "density_eps0": (lambda: score_inputs(score, data, 0.0, [held["f"]], batch, device), size),
        "density_ip_reference": (lambda: score_inputs(score, data, eps, [held["f"]], batch, device), size),
        "gradient_signs": (signs, size),
        "density_ip_cached": (lambda: score_signed(score, data, eps, held["s"], batch, device), size),
    }
    # one warm-up pass on a few items (allocator pools, lazy initialisation), then the measured steps
    small = TensorDataset(data.tensors[0][:batch], data.tensors[1][:batch])
    score_inputs(score, small, eps, [extract_features(model, small, batch, device)], batch, device)
    return {"n": n, "batch": batch, **{name: measure(*steps[name]) for name in STEPS}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs=2, type=int, default=[2000, 8000])
    ap.add_argument("--batches", nargs=2, type=int, default=[64, 512])
    ap.add_argument("--quick", action="store_true", help="a smoke run: sizes 256 1024, batches 16 64")
    ap.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    if args.quick:
        args.sizes, args.batches = [256, 1024], [16, 64]
    bench = Bench("scoring_memory", quick=args.quick)
    print(f"# scoring_memory: {describe(bench.machine)}; cnn D=64 at "
          f"3x32x32, gmm_sum, eps 0.01, one thread; figures in MiB (peak RSS above the step's start)")
    res = {}
    for n in args.sizes:
        for b in args.batches:
            out = subprocess.run([sys.executable, __file__, "--child", str(n), str(b)], check=True, capture_output=True,
                                 text=True, env={**os.environ, **MALLOC_ENV}).stdout.strip().splitlines()[-1]
            print(out, flush=True)
            res[(n, b)] = json.loads(out)
    (n1, n2), (b1, b2) = args.sizes, args.batches
    print("\n| step | " + " | ".join(f"N={n} batch={b}" for n in args.sizes for b in args.batches) + " |")
    print("|---|" + "---|" * 4)
    all_grow = all_flat = True
    for step in STEPS:
        cells = [f"{res[(n, b)][step]['working_mib']:.1f} ({res[(n, b)][step]['peak_mib']:.1f})"
                 for n in args.sizes for b in args.batches]
        print(f"| {step} | " + " | ".join(cells) + " |")
        w = {k: max(v[step]["working_mib"], 0.0) for k, v in res.items()}
        grows_with_batch = all(w[(n, b2)] >= 1.5 * w[(n, b1)] for n in args.sizes)
        flat_in_n = all(w[(n2, b)] <= 1.25 * w[(n1, b)] + 4 for b in args.batches)
        all_grow &= grows_with_batch
        all_flat &= flat_in_n
        print(f"|   | grows with batch: {grows_with_batch}; flat in N: {flat_in_n} | | | |")
    print("\ncells: working memory (peak above start minus the step's output), in brackets the raw peak; MiB")
    ok = all_grow and all_flat
    print(f"verdict: peak working memory grows with the batch size, not with the data set: {'PASS' if ok else 'FAIL'}")
    bench.record("scoring_memory.grows_with_batch", all_grow)
    bench.record("scoring_memory.flat_in_n", all_flat)
    bench.record("scoring_memory.ip_cached_mib", res[(n2, b2)]["density_ip_cached"]["working_mib"])
    print(bench.summary())
    sys.exit(0 if ok or args.quick else 1)


if __name__ == "__main__":
    main()
