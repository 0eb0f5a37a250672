"""The README's main job, end to end (slow: about 5 minutes on 2 cores; `pytest -m slow`)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from densitune.search.ood.densities import DENSITIES
from densitune.search.ood.scores import SCORES


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    p = subprocess.run([sys.executable, "-m", "densitune", "demo", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    for text in ("| baseline (msp) |", "| ensemble |", "| ddu |", "| ddu+ip |", "adv-pgd", "best configuration by validation auroc"):
        assert text in p.stdout, text
    files = sorted((out / "results").rglob("*.parquet"))
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    search = [r for r in rows if r["stage"] == "search"]
    # every score but the fitted baselines, which the demo does not search (its golden ranking predates them)
    assert {r["score"] for r in search} == set(SCORES.names()) - {"energy", "rmd", "knn", "vim"}
    assert {r["density"] for r in search} - {""} == set(DENSITIES.names())
    assert {"adv-fgsm", "adv-bim", "adv-pgd"} <= {r["ood_dataset"] for r in search}
    assert len([r for r in rows if r["stage"] == "train"]) == 8 * 15  # 8 networks x 15 epochs
    # The ranked configurations and the best configuration, exactly as the demo printed them before the
    # namespace move (recorded from main at d827435): same code path, same seeds, same numbers.
    # Tune's trial ids are random: they are masked on both sides.
    def masked(text: str) -> list[str]:
        return re.sub(r"trial=[0-9a-f]{8}\b", "trial=<id>", text).splitlines()

    golden = masked((Path(__file__).parent / "golden" / "demo_ranked_best.md").read_text())
    lines = masked(p.stdout)
    start = next(i for i, ln in enumerate(lines) if ln.startswith("### 1. "))
    assert lines[start:start + len(golden)] == golden
