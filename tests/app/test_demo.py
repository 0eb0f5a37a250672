"""The README's main job, end to end (slow: about 5 minutes on 2 cores; `pytest -m slow`)."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from densitune.search.ood.densities import DENSITIES
from densitune.search.ood.scores import SCORES


def _in_terminal(argv: list[str], timeout: float) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal as its stdin, stdout and stderr; its exit status and console text."""
    master, slave = pty.openpty()
    p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks, t0 = [], time.monotonic()
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
        assert time.monotonic() - t0 < timeout, "the demo did not finish in time"
    os.close(master)
    return p.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


def console_lines(text: str) -> list[str]:
    """What a person sees scroll by: every newline and every carriage-return redraw counts as a line."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r\n", "\n")
    return [ln for ln in re.split(r"[\r\n]", text) if ln.strip()]


def test_console_lines_count_redraws():
    assert console_lines("a\r\nbar 1\rbar 2\rbar 3\n\x1b[Ab\n") == ["a", "bar 1", "bar 2", "bar 3", "b"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, int, str]:
    """The demo, run once under a pseudo-terminal for every slow test here: (its folder, exit status, console text)."""
    out = tmp_path_factory.mktemp("demo-run") / "demo"
    rc, console = _in_terminal([sys.executable, "-m", "densitune", "demo", "--out", str(out)], timeout=3000)
    if out.is_dir():
        (out / "console.txt").write_text(console)  # what the terminal showed, for a look after the test
    return out, rc, console


@pytest.mark.slow
@pytest.mark.process
def test_demo_end_to_end(demo_run):
    out, rc, console = demo_run
    lines = console_lines(console)
    assert rc == 0, console[-3000:]
    # a console that fits a screen or two: a header, the progress bars, the summary
    assert len(lines) < 80, "\n".join(lines)
    assert not any("snapshotting" in ln or "Tuner.restore" in ln or "tensorboard" in ln.lower() for ln in lines)
    summary = "\n".join(lines[-16:])  # it ends with the best configuration and where things are
    assert "best configuration by validation auroc" in summary
    assert f"densitune report {out}  (every table: --full)" in summary and f"densitune plot {out}\n" in summary
    assert any(re.fullmatch(r"demo finished in \d+ s \(training \d+ s, search \d+ s, report \d+ s\)", ln.strip())
               for ln in lines[-3:]), lines[-3:]
    assert "epoch 15/15" in (out / "densitune.log").read_text()  # the detail is in the run's log

    # The tables the demo used to print are one command away.
    p = subprocess.run([sys.executable, "-m", "densitune", "report", str(out / "results"), "--full", "--top", "5",
                        "--where", "experiment = 'demo-search'"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for text in ("| baseline (msp) |", "| ensemble |", "| ddu |", "| ddu+ip |", "adv-pgd",
                 "| energy |", "| rmd |", "| knn", "| vim"):  # the field's baselines in the method table
        assert text in p.stdout, text
    files = sorted((out / "results").rglob("*.parquet"))
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    search = [r for r in rows if r["stage"] == "search"]
    assert {r["score"] for r in search} == set(SCORES.names())  # every score, the four baselines included
    # selection on the worst of a near and a far validation set
    assert {r["protocol"] for r in search} == {"val-ood:digits-blend+noise-blobs:min"}
    assert {r["ood_dataset"] for r in search if r["split"] == "val"} == {"digits-blend", "noise-blobs"}
    assert len({r["trial_id"] for r in search}) == 228
    assert len(list((out / "scores" / "experiment=demo-search").glob("p-*.parquet"))) == 228  # kept for compare
    assert set(DENSITIES.names()) <= {r["density"] for r in search}  # (rmd, knn, vim record their own fit there)
    assert {"adv-fgsm", "adv-bim", "adv-pgd"} <= {r["ood_dataset"] for r in search}
    assert len([r for r in rows if r["stage"] == "train"]) == 8 * 15  # 8 networks x 15 epochs
    # The ranked configurations and the best one, as recorded (README "Same numbers"): the same text on any
    # machine, the metrics bit-identical on the recording machine type and within the stated tolerance elsewhere.
    assert_golden(ranked_and_best(out), GOLDEN)


GOLDEN = (Path(__file__).parents[1] / "golden" / "demo_ranked_best.md").read_text().rstrip("\n").splitlines()


def ranked_and_best(out: Path) -> list[str]:
    """The demo's five best configurations (``report --full --top 5``) and ``best``, as the golden file holds them."""
    where = ["--where", "experiment = 'demo-search'"]
    p = subprocess.run([sys.executable, "-m", "densitune", "report", str(out / "results"), "--full", "--top", "5", *where],
                       capture_output=True, text=True, timeout=300)
    b = subprocess.run([sys.executable, "-m", "densitune", "best", str(out / "results"), *where],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and b.returncode == 0, (p.stderr + b.stderr)[-3000:]
    lines = p.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("### 1. "))
    return [*lines[start:], "", *b.stdout.splitlines()][:len(GOLDEN)]


@pytest.mark.slow
@pytest.mark.process
def test_demo_on_another_cpu_capability_keeps_the_ranking_within_tolerance(tmp_path):
    """Another CPU, stood in for by AVX2 kernels (torch and oneDNN) on this one: the same ranked configurations,
    ε and best configuration, every metric within the README's tolerance, and the rows say which kernels ran."""
    out = tmp_path / "demo"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    p = subprocess.run([sys.executable, "-m", "densitune", "demo", "--out", str(out), "-q"], env=env,
                       capture_output=True, text=True, timeout=3000)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_golden(ranked_and_best(out), GOLDEN)
    rows = [r for f in sorted((out / "results").rglob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert {(r["cpu_capability"], r["onednn_isa"]) for r in rows} == {("AVX2", "AVX2")}


#: README "Same numbers": on another CPU type (or GPU model) a metric printed with four decimals may differ by this
#: much; everything else (the ranking, the configurations, ε, D, λ, counts) is the same text. FPR95 counts OOD
#: inputs past one threshold, so a score that moves by 1e-4 can move it by a whole input (1/400 on photo-patches).
TOLERANCE = {"fpr95": 0.02}
METRIC_TOLERANCE = 0.005
_METRIC = re.compile(r"(?<![\d.])\d\.\d{4}(?![\d.])")


def golden_diff(lines: list[str], golden: list[str]) -> list[str]:
    """What differs between ``lines`` and ``golden`` beyond the promise: the text with every four-decimal metric
    masked must be equal line by line (same ranking, same configurations); each metric within its tolerance
    (:data:`TOLERANCE` by table column, else :data:`METRIC_TOLERANCE`)."""
    trial_ids = lambda text: re.sub(r"trial=[0-9a-f]+", "trial=<id>", text)  # noqa: E731 - Tune's trial ids are random
    problems = [] if len(lines) == len(golden) else [f"{len(lines)} lines, golden {len(golden)}"]
    columns: list[str] = []
    for i, (got, want) in enumerate(zip(lines, golden)):
        got, want = trial_ids(got), trial_ids(want)
        if _METRIC.sub("<m>", got) != _METRIC.sub("<m>", want):
            problems.append(f"line {i + 1}: {got!r} != {want!r}")
            continue
        cells = [c.strip() for c in want.strip().strip("|").split("|")] if want.startswith("|") else []
        if cells and not _METRIC.search(want) and not set("".join(cells)) <= set("-: "):
            columns = cells  # a table's header row
        names = [columns[j] if j < len(columns) else "" for j, c in enumerate(cells) if _METRIC.fullmatch(c)] \
            if cells else []
        for k, (a, b) in enumerate(zip(_METRIC.findall(got), _METRIC.findall(want))):
            tol = TOLERANCE.get(names[k] if k < len(names) else "", METRIC_TOLERANCE)
            if abs(float(a) - float(b)) > tol:
                problems.append(f"line {i + 1}: {a} vs golden {b} (more than {tol}): {want!r}")
    return problems


def assert_golden(lines: list[str], golden: list[str]) -> None:
    problems = golden_diff(lines, golden)
    assert not problems, "\n".join(problems[:20])


def test_golden_comparison_holds_the_promise_and_no_more():
    golden = ["### 1. cnn D=8 ce score=msp — ID test accuracy 0.9889; ip ε = 0.005; val auroc: no ip 0.9634",
              "| ood_dataset | auroc | fpr95 |", "|---|---|---|", "| digits-hflip | 0.9020 | 0.3760 |"]
    assert golden_diff(list(golden), golden) == []
    near = [golden[0].replace("0.9634", "0.9612"), *golden[1:3], "| digits-hflip | 0.9061 | 0.3951 |"]
    assert golden_diff(near, golden) == []  # auroc 0.0041 and fpr95 0.0191 off: within the promise
    assert golden_diff([*golden[:3], "| digits-hflip | 0.8969 | 0.3760 |"], golden)  # auroc 0.0051 off
    assert golden_diff([*golden[:3], "| digits-hflip | 0.9020 | 0.3539 |"], golden)  # fpr95 0.0221 off
    assert golden_diff([golden[0].replace("0.9889", "0.9838"), *golden[1:]], golden)  # accuracy 0.0051 off
    assert golden_diff([golden[0].replace("ε = 0.005", "ε = 0.01"), *golden[1:]], golden)  # another ε: another config
    assert golden_diff([golden[0].replace("D=8", "D=32"), *golden[1:]], golden)  # another ranking
    assert golden_diff(golden[:3], golden)  # a line missing


#: Scores the test OOD sets of an exported detector in a fresh interpreter: {"<seed>|<set>": test AUROC}.
REPRODUCE = textwrap.dedent('''
    import json, sys
    import torch
    from torch.utils.data import DataLoader
    import densitune
    from densitune.search.ood.metrics import ood_metrics
    from densitune.trainables.data import load_split

    path, sets = sys.argv[1], sys.argv[2:]
    out = {}
    for seed in densitune.load_detector(path).info["seeds"]:
        det = densitune.load_detector(path, seed=seed)
        shape, name = tuple(det.info["input"]["shape"]), det.info["input"]["dataset"]

        def scores(ds):
            x = torch.cat([b for b, _ in DataLoader(load_split(ds, "test", shape=shape), batch_size=10**6)])
            return det.score(x)

        s_id = scores(name)
        for ood in sets:
            out[f"{seed}|{ood}"] = ood_metrics(s_id, scores(ood))["auroc"]
    print(json.dumps(out))
''')


@pytest.mark.slow
@pytest.mark.parametrize("where, n_members", [("score = 'density' AND density = 'gmm_sum'", 2),
                                              ("score = 'ensemble_msp'", 1)])
@pytest.mark.process
def test_demo_exports_reproduce_the_search(demo_run, tmp_path, where, n_members):
    """A single-model (DDU, both seeds) and an ensemble configuration of the demo, exported and reloaded in a fresh
    process, give the search's per-seed test AUROC on every test OOD set to 1e-6."""
    out, rc, console = demo_run
    assert rc == 0, console[-3000:]
    det = tmp_path / "detector"
    e = subprocess.run([sys.executable, "-m", "densitune", "export", str(out / "results"), str(det), "--where",
                        f"experiment = 'demo-search' AND {where}"], capture_output=True, text=True, timeout=600)
    assert e.returncode == 0, e.stderr[-3000:]
    manifest = json.loads((det / "detector.json").read_text())
    assert len(manifest["members"]) == n_members
    rows = [r for f in sorted((out / "results").rglob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    trial = manifest["source"]["trial_id"]
    expected = {f"{r['seed']}|{r['ood_dataset']}": r["auroc"] for r in rows
                if r["stage"] == "search" and r["trial_id"] == trial and r["split"] == "test"
                and not r["ood_dataset"].startswith("adv-")}  # attacks are not OOD sets: no data set to reload
    sets = sorted({k.split("|")[1] for k in expected})
    assert sets == ["digits-hflip", "digits-rot90", "noise-uniform", "photo-patches"]
    assert len(expected) == len(sets) * n_members
    p = subprocess.run([sys.executable, "-c", REPRODUCE, str(det), *sets], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout)
    assert set(got) == set(expected)
    for key, auroc in expected.items():
        assert abs(got[key] - auroc) <= 1e-6, (where, key, got[key], auroc)


@pytest.mark.slow
@pytest.mark.process
def test_optuna_load_study_opens_the_demos_study(demo_run):
    """The README's snippet: optuna.load_study on RUN/optuna/demo-search/journal.log sees all 228 trials with their parameters."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    out, rc, console = demo_run
    assert rc == 0, console[-3000:]
    study = optuna.load_study(study_name="demo-search",
                              storage=JournalStorage(JournalFileBackend(str(out / "optuna" / "demo-search" / "journal.log"))))
    rows = [r for f in sorted((out / "results" / "experiment=demo-search").glob("*.parquet"))
            for r in pq.read_table(f).to_pylist()]
    record = {r["trial_id"]: r for r in rows}
    trials = study.get_trials()
    assert len(trials) == len(record) == 228
    assert {t.user_attrs["trial_id"] for t in trials} == set(record)
    for t in trials:
        row = record[t.user_attrs["trial_id"]]
        assert t.state == optuna.trial.TrialState.COMPLETE and t.value == pytest.approx(row["objective"], abs=0)
        assert t.params["score"] == row["score"] and t.params.get("density", "") == (row["density"] or "")
        assert t.params.get("eps", 0.0) == pytest.approx(row["eps"], abs=0)
        assert ("ensemble_model" if row["ensemble"] else "model") in t.params
