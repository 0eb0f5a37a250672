"""The library API: fit_detector on one's own network, numpy in, and detectors exported from a real run that
reproduce the search's per-seed test AUROC in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import densitune
from densitune.results.store import read_results
from densitune.search.ood.densities import create_density


class TinyNet(nn.Module):
    """One's own model following densitune.FeatureModel: (N, 1, 8, 8) -> (N, 3) features -> (N, 2) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
        self.head = nn.Linear(3, 2)

    def features(self, x):
        return self.body(x)

    def features_and_logits(self, x):
        z = self.features(x)
        return z, self.head(z)

    def forward(self, x):
        return self.head(self.features(x))


def test_fit_detector_on_own_model_matches_the_density_on_its_features():
    torch.manual_seed(0)
    model = TinyNet()
    x, y = torch.rand(120, 1, 8, 8), torch.randint(0, 2, (120,))
    det = densitune.fit_detector(model, DataLoader(TensorDataset(x, y), batch_size=32), density="gmm_sum")
    with torch.no_grad():
        ref = create_density("gmm_sum").fit(model.features(x), y).score_samples(model.features(x[:10]))
    assert torch.allclose(det.score(x[:10]), ref, atol=1e-9, rtol=0)
    assert torch.allclose(det.score(x[:10].numpy()), ref, atol=1e-9, rtol=0)  # numpy inputs
    # far-away inputs score lower (higher = more in-distribution)
    assert det.score(x[:10] + 5.0).max() < ref.min()
    # ε > 0 moves inputs towards higher density
    assert (det.score(x[:10], eps=0.01) >= ref - 1e-9).all()


def test_densities_take_numpy():
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(100, 3)), rng.integers(0, 3, 100)
    for name in ("gmm_sum", "gmm_max", "kde"):
        a = create_density(name).fit(z, y).score_samples(z[:7])
        b = create_density(name).fit(torch.from_numpy(z), torch.from_numpy(y)).score_samples(torch.from_numpy(z[:7]))
        assert torch.equal(a, b)


def test_torchvision_adapter_from_a_local_weights_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None, num_classes=1000).state_dict(), tmp_path / "r18.pth")
    model = densitune.TorchvisionFeatures.from_file("resnet18", tmp_path / "r18.pth", feature_dim=16, num_classes=3)
    assert isinstance(model, densitune.FeatureModel)
    x = torch.rand(6, 3, 64, 64)
    z, logits = model.eval().features_and_logits(x)
    assert z.shape == (6, 16) and logits.shape == (6, 3) and torch.allclose(model(x), logits)
    det = densitune.fit_detector(model, [(torch.rand(20, 3, 64, 64), torch.arange(20) % 3)], density="kde")
    assert det.score(x).shape == (6,)


def _cli(*args: str, env=None) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "densitune", *args], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


REPRODUCE = textwrap.dedent('''
    import json, sys
    import torch
    from torch.utils.data import DataLoader
    import densitune
    from densitune.search.ood.metrics import ood_metrics
    from densitune.trainables.data import load_split

    path, limit = sys.argv[1], int(sys.argv[2])
    seeds = densitune.load_detector(path).info["seeds"]
    out = {}
    for seed in seeds:
        det = densitune.load_detector(path, seed=seed)
        shape, name = tuple(det.info["input"]["shape"]), det.info["input"]["dataset"]

        def scores(ds):
            x = torch.cat([b for b, _ in DataLoader(load_split(ds, "test", shape=shape, limit=limit), batch_size=10**6)])
            return det.score(x)

        s_id = scores(name)
        for ood in ("noise-uniform", "digits-rot90"):
            out[f"{seed}|{ood}"] = ood_metrics(s_id, scores(ood))["auroc"]
    print(json.dumps(out))
''')


@pytest.mark.slow
@pytest.mark.process
def test_exported_detectors_reproduce_the_search_in_a_fresh_process(tmp_path):
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="r", dir="/tmp")}
    run = tmp_path / "run"
    _cli("train", "--out", str(run), "-D", "4", "--seeds", "0", "1", "--epochs", "2", "--num-cpus", "2", "-q", env=env)
    _cli("search", "--out", str(run), "--score", "density", "ensemble_msp", "--eps-grid", "0", "0.01",
         "--test-ood", "noise-uniform", "digits-rot90", "--eval-limit", "100", "--num-cpus", "2", "-q", env=env)
    rows = read_results(run / "results", experiment="search").to_pylist()
    for where, n_seeds in (("score = 'density'", 2), ("score = 'ensemble_msp'", 1)):
        out = tmp_path / where.split("'")[1]
        e = _cli("export", str(run / "results"), str(out), "--where", where)
        assert str(out) in e.stdout
        manifest = json.loads((out / "detector.json").read_text())
        assert len(manifest["members"]) == n_seeds
        if n_seeds == 1:  # an ensemble exports every member's network
            assert len(manifest["members"][0]["models"]) == 2 and not manifest["density"]
        else:
            assert manifest["density"] == "gmm_sum" and all(m["density"] for m in manifest["members"])
        for f in out.rglob("*.pt"):  # no pickle needed anywhere
            torch.load(f, weights_only=True)
        p = subprocess.run([sys.executable, "-c", REPRODUCE, str(out), "100"], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        got = json.loads(p.stdout)
        trial = manifest["source"]["trial_id"]
        expected = {f"{r['seed']}|{r['ood_dataset']}": r["auroc"] for r in rows
                    if r["trial_id"] == trial and r["split"] == "test"}
        assert len(expected) == 2 * n_seeds and set(got) == set(expected)
        for key, auroc in expected.items():
            assert abs(got[key] - auroc) <= 1e-6, (where, key, got[key], auroc)
