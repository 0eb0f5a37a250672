"""Over a hundred bad inputs, tried as a careful user would, each in a real ``densitune`` process.

Every case must end with exit status 2, exactly one stderr line (``densitune: error: ...``, under 300
characters, holding the expected fragment), no traceback, and nothing new or changed in its run folder
nor in the shared inputs. Most cases fail before torch or Ray are imported (about a second each); the
processes run a few at a time, each case asserted in its own test.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import train_to

from densitune.results.rows import provenance
from densitune.results.store import write_rows

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LONG = "x" * 5000

#: (category, argv with {W} = shared inputs, {O} = this case's --out, {C} = this case's folder, message fragment)
CASES: list[tuple[str, list[str], str]] = []


def case(category: str, argv: str | list[str], fragment: str) -> None:
    CASES.append((category, argv.split() if isinstance(argv, str) else argv, fragment))


S = "search --out {O} --models {W}/models"  # a search over the one trained network
T = "train --out {O}"
R = "report {W}/results"

# -- names: unknown registry names, views, formats, columns, experiment names
for argv, frag in [
    (f"{T} --backbone resnet9", "unknown backbone 'resnet9'"),
    (f"{T} --loss focal", "unknown loss 'focal'"),
    (f"{T} --dataset imagenet21k", "unknown dataset 'imagenet21k'"),
    (f"{S} --density gmm_prod", "unknown density 'gmm_prod'"),
    (f"{S} --score odin", "unknown score 'odin'"),
    (f"{S} --sampler random", "argument --sampler: invalid choice: 'random'"),
    (f"{S} --protocol test-ood", "argument --protocol: invalid choice: 'test-ood'"),
    (f"{S} --metric accuracy", "argument --metric: invalid choice: 'accuracy'"),
    (f"{S} --attacks cw", "argument --attacks: invalid choice: 'cw'"),
    (f"{S} --test-ood nosuchset", "unknown dataset 'nosuchset'"),
    (f"{S} --val-ood digits-rot90 --test-ood digits-rot90", "also a test OOD set"),
    (f"{S} --test-ood digits", "cannot also be an OOD set"),
    (f"{R} --view summry", "argument --view: invalid choice: 'summry'"),
    (f"{R} --format yaml", "argument --format: invalid choice: 'yaml'"),
    (f"{R} --metric accuracy", "argument --metric: invalid choice: 'accuracy'"),
    (f"{R} --by colour", "unknown --by column"),
    ("best {W}/results --metric acc", "argument --metric: invalid choice: 'acc'"),
    ("best {W}/results --format html", "argument --format: invalid choice: 'html'"),
    ("query {W}/results SELECT_1 --format xml", "argument --format: invalid choice: 'xml'"),
]:
    case("names", argv, frag)
case("names", ["train", "--out", "{O}", "--experiment", "my run"], "experiment name 'my run'")
case("names", ["train", "--out", "{O}", "--experiment", "../escape"], "experiment name '../escape'")
case("names", ["search", "--out", "{O}", "--models", "{W}/models", "--experiment", "a/b"], "experiment name 'a/b'")

# -- ranges: values outside what they may be
for argv, frag in [
    (f"{T} -D 0", "D must be > 0"),
    (f"{T} -D -8", "D must be > 0"),
    (f"{T} --epochs 0", "epochs must be > 0"),
    (f"{T} --lr 0", "learning rate must be > 0"),
    (f"{T} --lr -0.1", "learning rate must be > 0"),
    (f"{T} --batch-size 0", "batch size must be > 0"),
    (f"{T} --lam -1", "lambda must be >= 0"),
    (f"{T} --sn-coeff 0", "spectral-norm coefficient must be > 0"),
    (f"{T} --train-limit 0", "train limit must be >= 1"),
    (f"{S} --eps-grid 0 -0.01", "eps must be a finite number >= 0"),
    (f"{S} --eps-grid nan", "eps must be a finite number >= 0"),
    (f"{S} --eps-grid inf", "eps must be a finite number >= 0"),
    (f"{S} --eps-range 0.1 0.01", "eps range must satisfy 0 < low < high"),
    (f"{S} --eps-range 0 0.1", "eps range must satisfy 0 < low < high"),
    (f"{S} -D 0", "D must be > 0"),
    (f"{S} --attacks fgsm --attack-eps 0", "attack eps must be a finite number > 0"),
    (f"{S} --attacks bim --attack-steps 0", "attack steps must be an integer >= 1"),
    (f"{S} --sampler tpe --num-samples 0", "number of trials must be an integer >= 1"),
    (f"{S} --eval-limit 0", "eval limit must be an integer >= 1"),
    (f"{S} --density kde --kde-bandwidth -1", "bandwidth"),
    (f"{S} --density kde --kde-bandwidth wide", "bandwidth must be a finite number > 0 or one of 'scott', 'silverman'"),
    (f"{R} --top 0", "--top must be >= 1"),
    (f"{R} --top -3", "--top must be >= 1"),
]:
    case("ranges", argv, frag)

# -- files and formats: missing, corrupt, foreign, wrong version, planted pickles
for argv, frag in [
    ("report {W}/absent", "results directory not found"),
    ("report {W}/empty", "no result files"),
    ("report {W}/corrupt", "corrupt Parquet file"),
    ("report {W}/truncated", "corrupt Parquet file"),
    ("report {W}/foreign", "foreign file in results directory"),
    ("report {W}/foreignpq", "foreign Parquet file"),
    ("report {W}/oldversion", "has results schema v2"),
    ("best {W}/corrupt", "corrupt Parquet file"),
    ("query {W}/foreign SELECT_1", "foreign file"),
    ("best {W}/absent", "results directory not found"),
    ("search --out {O} --models {W}/absent", "models directory not found"),
    ("search --out {O} --models {W}/empty", "no trained models"),
    ("search --out {O} --models {W}/models-evil", "refused checkpoint"),
    ("search --out {O} --models {W}/models-badjson", "config.json"),
    ("search --out {O} --models {W}/models-foreign", "not a densitune checkpoint config"),
    (f"{T} --dataset cifar10 --data-root {{W}}/absent", "absent"),
    (f"{T} --dataset folder:{{W}}/absent", "absent"),
    (f"{S} --test-ood folder:{{W}}/empty", "empty"),
    ("search --out {O} --spec {W}/absent.yaml", "search spec file not found"),
    ("search --out {O} --spec {W}/specs", "search spec file not found"),
    ("search --out {O} --spec {W}/specs/binary.yaml", "not a text file"),
    ("train --out ftp://host/run", "unsupported storage scheme 'ftp'"),
    ("report s3://", "name a bucket"),
]:
    case("files and formats", argv, frag)

# -- YAML spec files: invalid, aliases, oversized, wrong keys and types, echoes capped
for name, frag in [
    ("bomb", "aliases"), ("alias", "aliases"), ("invalid", "not valid YAML"), ("tabs", "not valid YAML"),
    ("list", "a search spec is a mapping"), ("scalar", "a search spec is a mapping"), ("unknown", "unknown key 'eps_gird'"),
    ("typo", "did you mean 'densities'"), ("badtype", "key 'eps_grid' must be a list of numbers"),
    ("longvalue", "key 'experiment' must be a string"), ("longkey", "unknown key"), ("bigfile", "larger than 256 KiB"),
    ("epsrange", "key 'eps_range' must be [low, high]"), ("boolseed", "key 'seed' must be an integer"),
    ("unhashable", "not valid YAML"), ("dup-anchor-merge", "aliases"), ("deep", "nested"),
    ("numsamples", "key 'num_samples' must be an integer"), ("scores", "key 'scores' must be a list of strings"),
    ("dparams", "key 'density_params' must be a mapping"), ("dims", "key 'dims' must be a list of integers"),
    ("attacks", "key 'attacks' must be a list of strings"), ("proxyeps", "key 'proxy_eps' must be a number"),
    ("metric", "key 'metric' must be a string"), ("dataroot", "key 'data_root' must be a string"),
]:
    case("YAML", f"search --out {{O}} --spec {{W}}/specs/{name}.yaml", frag)

# -- SQL: --where can only filter, query can only read
for where in [
    "1=1; COPY results TO '{C}/leak.csv'", "1=1 UNION ALL SELECT * FROM results", "COPY results TO '{C}/leak.csv'",
    "ATTACH '{C}/x.db'", "1=1) UNION ALL SELECT * FROM results WHERE (1=1", "trial_id IN (SELECT trial_id FROM results)",
    "EXISTS (SELECT 1)", "auroc >", "no_such_column = 1", "(SELECT count(*) FROM read_csv('/etc/passwd')) > 0", LONG,
]:
    case("SQL", ["report", "{W}/results", "--where", where], "bad --where")
    if where in ("1=1 UNION ALL SELECT * FROM results", "auroc >"):
        case("SQL", ["best", "{W}/results", "--where", where], "bad --where")
for sql, frag in [
    ("COPY results TO '{C}/leak.csv'", "only a SELECT"), ("ATTACH '{C}/x.db' AS x", "only a SELECT"),
    ("SELECT 1; SELECT 2", "exactly one SELECT"), ("SET enable_external_access = true", "only a SELECT"),
    ("SELECT * FROM read_csv('/etc/passwd')", "--allow-files"), ("SELECT * FROM nowhere", "bad query"),
    ("DROP VIEW results", "only a SELECT"), ("CREATE TABLE t AS SELECT 1", "only a SELECT"), ("INSTALL httpfs", "only a SELECT"),
]:
    case("SQL", ["query", "{W}/results", sql], frag)

# -- resources: flags checked before Ray starts
for argv, frag in [
    (f"{T} --num-cpus 0", "--num-cpus must be > 0"), (f"{T} --num-cpus -2", "--num-cpus must be > 0"),
    (f"{T} --cpus-per-trial 0", "--cpus-per-trial must be > 0"), (f"{T} --cpus-per-trial -1", "--cpus-per-trial must be > 0"),
    (f"{T} --cpus-per-trial nan", "--cpus-per-trial must be a finite number"),
    (f"{T} --cpus-per-trial inf", "--cpus-per-trial must be a finite number"),
    (f"{T} --gpus-per-trial -1", "--gpus-per-trial must be 0, a fraction"),
    (f"{T} --gpus-per-trial 1.5", "--gpus-per-trial must be 0, a fraction"),
    (f"{T} --gpus-per-trial nan", "--gpus-per-trial must be a finite number"),
    (f"{T} --seeds -1", "--seeds must be integers >= 0"), (f"{T} --seeds 0 1 -5", "--seeds must be integers >= 0"),
    (f"{S} --num-cpus 0", "--num-cpus must be > 0"), (f"{S} --cpus-per-trial 0", "--cpus-per-trial must be > 0"),
    (f"{S} --max-concurrent 0", "--max-concurrent must be > 0"), (f"{S} --seed -1", "--seed must be integers >= 0"),
    ("demo --out {O} --num-cpus 0", "--num-cpus must be > 0"),
]:
    case("resources", argv, frag)

# -- permissions: an output folder that cannot be written (an immutable parent: root ignores chmod)
for argv, frag in [
    ("train --out {W}/frozen/run", "is not writable"), ("search --out {W}/frozen/run --models {W}/models", "is not writable"),
    ("train --out {W}/frozen/deeper/run", "is not writable"),
    ("search --out {W}/frozen/run --models {W}/models --resume", "is not writable"),
]:
    case("permissions", argv, frag)

# -- storage: file system objects in the way
for argv, frag in [
    ("train --out {W}/afile", "is not a folder"), ("train --out {W}/afile/run", "is not a folder"),
    ("search --out {W}/afile/run --models {W}/models", "is not a folder"), ("train --out {W}/dangling/run", "dangling link"),
    ("search --out {O} --models {W}/afile", "models directory not found"), ("report {W}/afile", "results directory not found"),
    ("report {W}/dangling", "results directory not found"),
]:
    case("storage", argv, frag)

# -- usage: malformed flags (argparse, in the same one-line form)
for argv, frag in [
    ("train --epochs ten", "invalid int value: 'ten'"), ("search --eps-grid abc", "invalid float value: 'abc'"),
    ("search --eps-range 0.1", "expected 2 arguments"), ("train --no-such-flag", "unrecognized arguments"),
    ("frobnicate", "invalid choice"), ("report", "the following arguments are required"),
]:
    case("usage", argv, frag)


def _heavy(argv: list[str], category: str) -> bool:
    """Cases that get past the flag and spec checks of train/search import torch first (~5 s each on 2 cores)."""
    return argv[0] in ("train", "search") and (category in ("names", "ranges", "files and formats")
                                               or "{W}/afile" in argv and "--models" in argv) and "--spec" not in argv


FAST = [i for i, (c, a, _) in enumerate(CASES) if not _heavy(a, c)]
HEAVY = [i for i, (c, a, _) in enumerate(CASES) if _heavy(a, c)]


def _tree(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else "dir-or-link"
    return out


def _write_trial(root: Path, trial: str, val: float) -> None:
    common = dict(experiment="e", trial_id=trial, stage="search", protocol="val-ood:v", backbone="cnn", id_dataset="digits",
                  loss="ce", D=8, spectral=True, density="kde", score="density", eps=0.0, seed=0, started_at=T0,
                  **provenance("cpu"))
    write_rows(root, [{**common, "ood_dataset": "v", "split": "val", "auroc": val, "auprc": val, "fpr95": 1 - val},
                      {**common, "ood_dataset": "t", "split": "test", "auroc": val, "auprc": val, "fpr95": 1 - val}], name=trial)


def _chattr(flag: str, path: Path) -> bool:
    return shutil.which("chattr") is not None and subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/densitune-pwned",))


SPECS = {
    "bomb": "\n".join(['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
                      + [f"{c}: &{c} [{','.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")] + ["test_ood: *i"]),
    "alias": "x: &x [noise-uniform]\ntest_ood: *x\n",
    "dup-anchor-merge": "base: &b {sampler: grid}\n<<: *b\n",
    "invalid": "test_ood: [noise-uniform\n",
    "tabs": "scores:\n\t- density\n",
    "list": "- a\n- b\n",
    "scalar": "just text\n",
    "unknown": "eps_gird: [0]\n",
    "typo": "densites: [kde]\n",
    "badtype": "eps_grid: [zero]\n",
    "longvalue": f"experiment: [{', '.join(['1'] * 5000)}]\n",
    "longkey": "k" * 1000 + ": 1\n",  # YAML caps a plain key at 1024 characters
    "bigfile": "test_ood: [" + ", ".join(["noise-uniform"] * 30000) + "]\n",
    "epsrange": "eps_range: [0.1, 0.2, 0.3]\n",
    "boolseed": "seed: true\n",
    "unhashable": "? [a, b]\n: 1\n",
    "deep": "a: " + "[" * 5000 + "]" * 5000 + "\n",
    "numsamples": "num_samples: many\n", "scores": "scores: 3\n", "dparams": "density_params: [1]\n",
    "dims": "dims: [a]\n", "attacks": "attacks: {x: 1}\n", "proxyeps": "proxy_eps: high\n",
    "metric": "metric: [auroc]\n", "dataroot": "data_root: 5\n",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("inputs")
    for t, v in (("a", 0.9), ("b", 0.8)):
        _write_trial(w / "results", t, v)
    (w / "empty").mkdir()
    for name in ("corrupt", "truncated", "foreign", "foreignpq", "oldversion"):
        (w / name / "experiment=e").mkdir(parents=True)
    (w / "corrupt/experiment=e/search-x.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    good = next((w / "results").rglob("*.parquet")).read_bytes()
    (w / "truncated/experiment=e/search-x.parquet").write_bytes(good[: len(good) // 2])
    (w / "foreign/experiment=e/notes.csv").write_text("a,b\n1,2\n")
    pq.write_table(pa.table({"x": [1, 2]}), w / "foreignpq/experiment=e/search-x.parquet")
    pq.write_table(pa.table({"schema_version": pa.array([2], pa.int32()), "x": [1]}), w / "oldversion/experiment=e/search-x.parquet")
    ckpt = train_to(w / "models", "t", epochs=1, feature_dim=4)
    for name in ("models-evil", "models-badjson", "models-foreign"):
        shutil.copytree(w / "models", w / name)
    evil = next((w / "models-evil").rglob("model.pt"))
    torch.save({"format": "densitune-checkpoint", "payload": Evil()}, evil)
    next((w / "models-badjson").rglob("config.json")).write_text("{not json")
    next((w / "models-foreign").rglob("config.json")).write_text('{"format": "other"}')
    assert ckpt.is_dir()
    (w / "specs").mkdir()
    for name, text in SPECS.items():
        (w / "specs" / f"{name}.yaml").write_text(text)
    (w / "specs/binary.yaml").write_bytes(b"\xff\xfe\x00\x01" * 10)
    (w / "afile").write_text("a file, not a folder\n")
    (w / "dangling").symlink_to(w / "nowhere")
    (w / "frozen").mkdir()
    if not _chattr("+i", w / "frozen"):
        (w / "frozen").chmod(0o500)  # without chattr (not root), plain permissions stop the writes
    yield w
    _chattr("-i", w / "frozen")
    (w / "frozen").chmod(0o700)


def _run_case(world: Path, root: Path, index: int) -> tuple[subprocess.CompletedProcess, dict, dict]:
    category, argv, _ = CASES[index]
    c = root / f"case{index:03d}"
    c.mkdir()
    fill = {"{W}": str(world), "{O}": str(c / "run"), "{C}": str(c)}
    args = []
    for a in argv:
        for k, v in fill.items():
            a = a.replace(k, v)
        args.append(a.replace("SELECT_1", "SELECT 1"))
    before = _tree(c)
    env = {**os.environ, "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", "/tmp/rt-bad")}
    p = subprocess.run([sys.executable, "-m", "densitune", *args], capture_output=True, text=True, cwd=c, timeout=300, env=env)
    return p, before, _tree(c)


def _run_all(world: Path, root: Path, indices: list[int]) -> dict:
    """The cases run once each, two processes at a time; the shared inputs must come out unchanged."""
    shared = _tree(world)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(indices, pool.map(lambda i: _run_case(world, root, i), indices)))
    results[-1] = (shared, _tree(world))
    return results


@pytest.fixture(scope="module")
def outcomes(world, tmp_path_factory) -> dict:
    return _run_all(world, tmp_path_factory.mktemp("cases"), FAST)


@pytest.fixture(scope="module")
def heavy_outcomes(world, tmp_path_factory) -> dict:
    return _run_all(world, tmp_path_factory.mktemp("heavy"), HEAVY)


def test_the_table_is_large_and_varied():
    categories = {c for c, _, _ in CASES}
    assert len(CASES) >= 100 and len(categories) >= 8, (len(CASES), categories)
    assert len(FAST) >= 100 and len({CASES[i][0] for i in FAST}) >= 8  # the default tier alone


def check_case(index: int, outcome: tuple) -> None:
    category, argv, fragment = CASES[index]
    p, before, after = outcome
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, (argv, p.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("densitune: error: "), (argv, p.stderr[-2000:])
    assert len(lines[0]) < 300, lines[0]
    assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in p.stderr and "MemoryError" not in p.stderr
    assert after == before, (argv, sorted(set(after) - set(before)))  # nothing new in the run folder
    assert not Path("/tmp/densitune-pwned").exists()


@pytest.mark.process
@pytest.mark.parametrize("index", FAST, ids=[f"{CASES[i][0]}-{i}" for i in FAST])
def test_bad_input(index, outcomes):
    check_case(index, outcomes[index])


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.parametrize("index", HEAVY, ids=[f"{CASES[i][0]}-{i}" for i in HEAVY])
def test_bad_input_past_torch_import(index, heavy_outcomes):
    check_case(index, heavy_outcomes[index])


@pytest.mark.process
def test_shared_inputs_unchanged(outcomes):
    before, after = outcomes[-1]
    assert after == before, sorted(set(after) ^ set(before))
