"""Where the first wave of an ε search spends its seconds: two trials started at the same moment, Ray-free.

The first wave of ``eps_amortisation.py`` (one trial per CPU, started together on fresh actors) pays for
everything a search does once: decoding the PNG folders, clean features, the density fit, the gradient signs,
the first import of the metric libraries. This script runs that wave without Ray: two processes (one torch
thread each, as Tune's trials), each running one trial (``run_trial``) of the bench's workload on one shared
disk cache, both released at once, with the cached path (the default, claims on), the cached path without the
claim pass (``--no-claim``: the second trial waits on the first one's lock) and the uncached reference path.
Each step is timed by wrapping the function that does it.

    python bench/eps_first_wave.py --workdir DIR   # DIR: a --workdir of bench/eps_amortisation.py (data, network)
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EPS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True, help="the --workdir of a bench/eps_amortisation.py run")
    ap.add_argument("--no-claim", action="store_true", help="also run the cached wave without the claim pass")
    args = ap.parse_args()
    if not (Path(args.workdir) / "models").is_dir():
        sys.exit(f"eps_first_wave: error: no models under {args.workdir}: run bench/eps_amortisation.py --workdir "
                 f"{args.workdir} first")
    modes = ["uncached", "cached", *(["cached, no claim pass"] if args.no_claim else [])]
    print(f"# eps_first_wave: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; two trials at once, "
          "one torch thread each, one shared disk cache; seconds per process (process 0 / process 1)")
    for mode in modes:
        res = wave(args.workdir, mode)
        labels = [label for label in STEPS.values() if any(label in r[3] for r in res)]
        print(f"\n## {mode}: first trial {' / '.join(f'{r[2]:.2f}' for r in res)} s "
              f"(imports before it {' / '.join(f'{r[1]:.2f}' for r in res)} s)")
        print("| step | seconds |")
        print("|---|---|")
        for label in labels:
            print(f"| {label} | {' / '.join(f'{r[3].get(label, 0.0):.2f}' for r in res)} |")
        print(f"| computed (counts) | {' / '.join(str(r[4]) for r in res)} |")


if __name__ == "__main__":
    main()
