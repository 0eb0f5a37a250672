"""Where the first wave of an ε search spends its seconds: two trials started at the same moment, Ray-free.

The first wave of ``eps_amortisation.py`` (one trial per CPU, started together on fresh actors) pays for
everything a search does once: decoding the PNG folders, clean features, the density fit, the gradient signs,
the first import of the metric libraries. This script runs that wave without Ray: two processes (one torch
thread each, as Tune's trials), each running one trial (``run_trial``) of the bench's workload on one shared
disk cache, both released at once, with the cached path (the default, claims on), the cached path without the
claim pass (``--no-claim``: the second trial waits on the first one's lock) and the uncached reference path.
Each step is timed by wrapping the function that does it.

Then, on one thread and in CPU time, the two per-input costs every ε search is made of: ``f``, one scoring forward
pass (what a cached trial pays per input), and ``g``, the forward + input-gradient pass that gives the sign (what
the cache pays once per split, and the reference path per trial on top of ``f``); and from them the compute of the
bench's search (4 splits of 2,000 inputs, k = 8): uncached 8·4·(g + f), cached 4·g + 8·4·f, and the largest cost
``F`` common to both modes (trial actors' start, decoding, driver, Ray) at which the ratio still reaches 2:
``F = uncached − 2·cached``. Compare it with the machine's CPU seconds per search that eps_amortisation.py prints
(``F`` measured = those minus the compute).

    python bench/eps_first_wave.py --workdir DIR   # DIR: a --workdir of bench/eps_amortisation.py (data, network)
    python bench/eps_first_wave.py --workdir DIR --quick   # after eps_amortisation.py --workdir DIR --quick

``--quick`` reads the smoke workload (DIR/quick) and times the per-input costs on 256 inputs, 2 rounds, without
the channels-last variant. Records (information, no gate): eps_first_wave.f_us, .g_us, .common_ceiling_cpu_s.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from _harness import Bench, describe
from eps_amortisation import EPS

STEPS = {  # (module, function) -> label
    ("densitune.search.evaluate", "load_split"): "decode the PNG splits",
    ("densitune.search.workspace", "extract_features"): "clean features",
    ("densitune.search.workspace", "fit_density"): "density fit",
    ("densitune.search.evaluate", "gradient_signs"): "gradient signs (fwd + bwd)",
    ("densitune.search.evaluate", "score_signed"): "scoring from signs (fwd)",
    ("densitune.search.evaluate", "score_inputs"): "uncached scoring (fwd + bwd + fwd)",
    ("densitune.search.evaluate", "detection_metrics"): "metrics (numpy: no scikit-learn or scipy import)",
    ("fcntl", "flock"): "waiting on cache locks",
}


def trial(index: int, work: str, cache: str, mode: str, out: Any) -> None:
    t0 = time.perf_counter()
    import importlib

    import torch

    torch.set_num_threads(1)
    import ray.tune  # noqa: F401 - what a trial actor imports before its trial

    from densitune.search.prepare import prepare_search
    from densitune.search.space import grid_points
    from densitune.search.trial import run_trial
    from densitune.search.workspace import Workspace

    imports = time.perf_counter() - t0
    seconds: dict[str, float] = defaultdict(float)
    for (module, name), label in STEPS.items():
        mod = importlib.import_module(module)
        real = getattr(mod, name)

        def timed(*a: Any, _real: Any = real, _label: str = label, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return _real(*a, **k)
            finally:
                seconds[_label] += time.perf_counter() - t

        setattr(mod, name, timed)
    if mode == "cached, no claim pass":
        import densitune.search.trial as trial_mod

        trial_mod.claim_gradient_signs = lambda *a: 0  # type: ignore[assignment]
    spec, groups = prepare_search(dict(
        experiment="w", models=f"{work}/models", data_root=f"{work}/data", val_ood=f"folder:{work}/data/ood-blend",
        test_ood=[f"folder:{work}/data/ood-photo"], densities=["gmm_sum"], scores=["density"], eps_grid=list(EPS)))
    ws = Workspace(cache_dir=cache, ip_cache=mode != "uncached")
    out.put(("ready", index))
    while not os.path.exists(f"{cache}/go"):
        time.sleep(0.005)
    t = time.perf_counter()
    run_trial(ws, spec, groups[0], grid_points(spec, groups)[index], "t")
    out.put((index, imports, time.perf_counter() - t, dict(seconds), dict(ws.counts)))


def wave(work: str, mode: str) -> list[tuple]:
    cache = tempfile.mkdtemp(prefix="densitune-wave-")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=trial, args=(i, work, cache, mode, q)) for i in range(2)]
    for p in procs:
        p.start()
    for _ in procs:
        q.get()
    Path(cache, "go").touch()
    results = sorted(q.get() for _ in procs)
    for p in procs:
        p.join()
    shutil.rmtree(cache, ignore_errors=True)
    return results


def per_input_costs(work: str, batch: int = 256, n: int = 2000, rounds: int = 7,
                    channels_last: bool = False) -> tuple[float, float]:
    """(f, g): CPU seconds per input, one torch thread, median of ``rounds`` interleaved passes over ``n`` random
    inputs, of the bench's score (gmm_sum density on the bench's network): f = ``score(x)`` under no_grad (one
    scoring forward pass), g = ``score.gradient_sign(x)`` (forward + input gradient). ``channels_last``: network
    and inputs in that memory format (information: what it would change; the search does not use it on the CPU)."""
    import statistics

    import torch
    from torch.nn.utils import parametrize
    from torch.utils.data import TensorDataset

    from densitune.search.ood.density_spec import DensitySpec
    from densitune.search.ood.scores import create_score
    from densitune.search.scoring import extract_features, fit_density
    from densitune.trainables.train.checkpoint import load_model

    torch.set_num_threads(1)
    (ckpt,) = [p.parent for p in Path(work, "models").rglob("model.pt")]
    loaded = load_model(ckpt)
    model = loaded.model
    x = torch.rand(n, *loaded.data["shape"], generator=torch.Generator().manual_seed(0))
    feats = extract_features(model, TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch, torch.device("cpu"))
    feats.y = feats.logits.argmax(1)  # a fit needs classes; any labelling times the same
    counts = torch.bincount(feats.y)
    if (counts[counts > 0] < 2).any():  # a class of one input has no covariance (small --quick runs): round robin
        feats.y = torch.arange(n) % feats.logits.shape[1]
    score = create_score("density", [model], fit_density(DensitySpec("gmm_sum"), feats, torch.device("cpu")))
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    batches = [x[i:i + batch] for i in range(0, n, batch)]

    def forward() -> None:
        with torch.no_grad():
            for b in batches:
                score(b)

    def gradient() -> None:
        for b in batches:
            score.gradient_sign(b)

    times: dict[str, list[float]] = {"f": [], "g": []}
    with parametrize.cached():
        forward(), gradient()
        for _ in range(rounds):
            for key, run in (("f", forward), ("g", gradient)):
                t = time.process_time()
                run()
                times[key].append(time.process_time() - t)
    return statistics.median(times["f"]) / n, statistics.median(times["g"]) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True, help="the --workdir of a bench/eps_amortisation.py run")
    ap.add_argument("--no-claim", action="store_true", help="also run the cached wave without the claim pass")
    ap.add_argument("--quick", action="store_true", help="the smoke workload of eps_amortisation.py --quick; fewer rounds")
    args = ap.parse_args()
    work = str(Path(args.workdir) / "quick") if args.quick else args.workdir
    if not (Path(work) / "models").is_dir():
        sys.exit(f"eps_first_wave: error: no models under {work}: run bench/eps_amortisation.py --workdir "
                 f"{args.workdir}{' --quick' if args.quick else ''} first")
    bench = Bench("eps_first_wave", quick=args.quick)
    modes = ["uncached", "cached", *(["cached, no claim pass"] if args.no_claim else [])]
    print(f"# eps_first_wave: {describe(bench.machine)}; two trials at once, "
          "one torch thread each, one shared disk cache; seconds per process (process 0 / process 1)")
    for mode in modes:
        res = wave(work, mode)
        labels = [label for label in STEPS.values() if any(label in r[3] for r in res)]
        print(f"\n## {mode}: first trial {' / '.join(f'{r[2]:.2f}' for r in res)} s "
              f"(imports before it {' / '.join(f'{r[1]:.2f}' for r in res)} s)")
        print("| step | seconds |")
        print("|---|---|")
        for label in labels:
            print(f"| {label} | {' / '.join(f'{r[3].get(label, 0.0):.2f}' for r in res)} |")
        print(f"| computed (counts) | {' / '.join(str(r[4]) for r in res)} |")
    splits, n, k = 4, 2000, len(EPS)

    def compute(f: float, g: float) -> tuple[float, float]:
        """CPU-s of the bench's search's compute: uncached k·splits·n·(g + f), cached splits·n·g + k·splits·n·f."""
        return k * splits * n * (g + f), splits * n * g + k * splits * n * f

    n_inputs, rounds = (256, 2) if args.quick else (2000, 7)
    f, g = per_input_costs(work, n=n_inputs, rounds=rounds)
    uncached, cached = compute(f, g)
    print(f"\n## per-input costs (one thread, CPU time, median of {rounds}): scoring forward f = {f * 1e6:.0f} us, forward + "
          f"input gradient g = {g * 1e6:.0f} us (g / f = {g / f:.2f})")
    print(f"compute of the bench's search ({splits} splits of {n}, k = {k}): uncached {k}*{splits}*(g + f) = {uncached:.1f} "
          f"CPU-s, cached {splits}*g + {k}*{splits}*f = {cached:.1f} CPU-s; ratio >= 2 while the cost common to both modes "
          f"is at most uncached - 2*cached = {uncached - 2 * cached:.1f} CPU-s")
    bench.record("eps_first_wave.f_us", f * 1e6)
    bench.record("eps_first_wave.g_us", g * 1e6)
    bench.record("eps_first_wave.common_ceiling_cpu_s", uncached - 2 * cached)
    if args.quick:
        print(bench.summary())
        return
    fc, gc = per_input_costs(work, channels_last=True)
    uncached_cl, cached_cl = compute(fc, gc)
    print(f"(information) the same in channels-last: f = {fc * 1e6:.0f} us, g = {gc * 1e6:.0f} us; compute uncached "
          f"{uncached_cl:.1f}, cached {cached_cl:.1f} CPU-s")
    print(bench.summary())


if __name__ == "__main__":
    main()
