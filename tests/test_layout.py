"""One namespace, `densitune`, in every way it is installed and run; layers whose imports point one way."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Source folder of each top-level sub-package (as pyproject's package-dir maps them).
FOLDERS = {"densitune": ROOT / "src" / "densitune", "densitune.search": ROOT / "search",
           "densitune.trainables": ROOT / "trainables"}


def _py(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **env}, timeout=120)


def _modules(package: str) -> list[str]:
    """Every module of ``package``, found from its source folder (so a new file cannot be missed)."""
    top = next(k for k in sorted(FOLDERS, key=len, reverse=True) if package == k or package.startswith(k + "."))
    folder = FOLDERS[top].joinpath(*package[len(top):].strip(".").split(".")) if package != top else FOLDERS[top]
    out = []
    for f in sorted(folder.rglob("*.py")):
        parts = list(f.relative_to(folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join([package, *parts]))
    return out


def test_neutral_directory_sees_only_densitune(tmp_path):
    p = _py("import densitune; print(densitune.__version__)", tmp_path)
    assert p.returncode == 0, p.stderr
    from importlib.metadata import version

    assert p.stdout.strip() == version("densitune") != "0+unknown"
    for old in ("search", "trainables"):
        p = _py(f"import {old}", tmp_path)
        assert p.returncode != 0 and f"No module named '{old}'" in p.stderr


def test_distribution_installs_exactly_one_top_level_name():
    from importlib.metadata import distribution, packages_distributions

    assert distribution("densitune").read_text("top_level.txt").split() == ["densitune"]
    assert sorted(name for name, dists in packages_distributions().items() if "densitune" in dists) == ["densitune"]


def test_pyproject_lists_every_package_folder():
    """A sub-package folder missing from pyproject's `packages` would be left out of a plain install."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"] == {k: str(v.relative_to(ROOT)) for k, v in FOLDERS.items()}
    found = set()
    for top, folder in FOLDERS.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join([top, *rel]))
    assert set(cfg["packages"]) == found


def _imports(f: Path) -> list[str]:
    """Absolute module names imported by file ``f``."""
    out = []
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return out


def _package_files() -> list[Path]:
    return [f for folder in FOLDERS.values() for f in folder.rglob("*.py")]


def test_no_module_imports_the_old_top_level_names():
    for f in _package_files():
        for name in _imports(f):
            assert name.split(".")[0] not in ("search", "trainables"), f"{f}: imports {name}"


# The OOD maths and the results layer know nothing of Ray, files of runs, the training loop or the CLI.
PURE = ["densitune.search.ood", "densitune.results"]
FORBIDDEN = ["ray", "densitune.trainables.train", "densitune.trainables.train.loop", "densitune.cli",
             "densitune.search.tune", "densitune.search.evaluate", "densitune.run.ray_runtime"]


def test_ood_and_results_layers_import_no_ray_training_or_cli(tmp_path):
    mods = [m for pkg in PURE for m in _modules(pkg)]
    assert "densitune.search.ood.densities" in mods and "densitune.results.store" in mods
    code = (f"import importlib, json, sys\nfor m in {mods!r}: importlib.import_module(m)\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m in {FORBIDDEN!r} or m.startswith('ray.'))))")
    p = _py(code, tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == []


def test_cli_is_imported_by_nothing():
    for f in _package_files():
        if f.name != "__main__.py" and f.parent.name != "cli":  # the cli package itself, and `python -m densitune`
            assert not any(n == "densitune.cli" or n.startswith("densitune.cli.") for n in _imports(f)), f


def test_no_unsafe_deserialisation_in_the_package():
    """Every torch.load passes weights_only=True (ruff's S301 covers pickle)."""
    loads = 0
    for f in _package_files():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            func = node.func if isinstance(node, ast.Call) else None
            if isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name) \
                    and func.value.id == "torch":
                loads += 1
                kw = {k.arg: k.value for k in node.keywords}  # type: ignore[union-attr]
                flag = kw.get("weights_only")
                assert isinstance(flag, ast.Constant) and flag.value is True, f"{f}:{node.lineno}: torch.load without weights_only=True"
    assert loads > 0  # the checkpoint reader is among them


@pytest.mark.slow
def test_plain_wheel_install_works_from_a_neutral_directory(tmp_path):
    """A plain (non-editable) install: the wheel holds exactly `densitune/...`, every module, and runs."""
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "-w", str(tmp_path / "whl"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    (wheel,) = (tmp_path / "whl").glob("densitune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.startswith("densitune-")} == {"densitune"}
    expected = {m for top in FOLDERS for m in _modules(top)}
    inside = {n[:-3].replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py")}
    assert expected <= inside
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    for d in ("search", "trainables", "densitune"):
        (tmp_path / "cwd" / d).mkdir(parents=True)
    q = _py("import densitune, densitune.cli, densitune.search.tune, densitune.trainables.train.tune;"
            "print(densitune.__file__)", tmp_path / "cwd", PYTHONPATH=str(site))
    assert q.returncode == 0, q.stderr
    assert q.stdout.strip().startswith(str(site))


def test_ray_working_dir_of_the_repo_root_imports_the_installed_package(tmp_path):
    """What `ray job submit --working-dir .` does to workers: the repo root, uploaded, becomes their cwd."""
    code = f"""
import json, os, sys, ray
ray.init(num_cpus=1, include_dashboard=False, runtime_env={{"working_dir": {str(ROOT)!r}}}, log_to_driver=False)
@ray.remote
def probe():
    import densitune, densitune.search.tune, densitune.trainables.train.tune
    return {{"cwd": os.getcwd(), "file": densitune.__file__, "upload": os.path.isdir("search") and os.path.isfile("pyproject.toml"),
            "tops": sorted({{m.split('.')[0] for m in sys.modules}})}}
print(json.dumps(ray.get(probe.remote())))
ray.shutdown()
"""
    with tempfile.TemporaryDirectory(prefix="rt", dir="/tmp") as ray_tmp:  # Ray's socket paths must stay short
        p = _py(code, tmp_path, RAY_TMPDIR=ray_tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["upload"] and out["cwd"] != str(ROOT)  # the worker runs in the uploaded copy of the repo root
    assert not out["file"].startswith(out["cwd"])
    assert "search" not in out["tops"] and "trainables" not in out["tops"]


def test_train_and_search_through_ray_from_a_folder_holding_search_trainables_densitune(tmp_path):
    """Folders named like the package's parts in the working directory (and `--out search`) do not shadow it."""
    for d in ("search", "trainables", "densitune"):
        (tmp_path / d).mkdir()
    run = [sys.executable, "-m", "densitune"]
    common = ["--out", "search", "--num-cpus", "2", "-q"]
    t = subprocess.run([*run, "train", *common, "-D", "4", "--epochs", "1", "--experiment", "x"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert t.returncode == 0, t.stderr[-3000:]
    s = subprocess.run([*run, "search", *common, "--eps-grid", "0", "0.01",
                        "--experiment", "s"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert s.returncode == 0, s.stderr[-3000:]
    rows = [r for f in (tmp_path / "search" / "results").rglob("*.parquet") for r in pq.read_table(f).to_pylist()]
    assert sum(r["stage"] == "train" for r in rows) == 1  # one network, one epoch
    search = [r for r in rows if r["stage"] == "search"]
    assert sorted({r["eps"] for r in search}) == [0.0, 0.01]
    assert {r["split"] for r in search} == {"val", "test"}
