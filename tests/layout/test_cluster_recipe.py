"""The cluster recipe: both launcher configs pass Ray's own schema, a misspelt key does not, and every node
installs the project at the pinned versions written in the repository."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["cluster.yaml", "examples/cluster-onprem.yaml"]


def _validate(cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


@pytest.mark.parametrize("name", CONFIGS)
def test_cluster_config_is_valid_and_installs_pinned_versions(name):
    cfg = yaml.safe_load((ROOT / name).read_text())
    _validate(cfg)
    installs = [c for c in cfg["setup_commands"] if "pip install" in c and "densitune" in c]
    assert installs and all("-c " in c and "constraints.txt" in c and "ray[default]" in c for c in installs)
    mount = next(dest for dest, src in cfg["file_mounts"].items() if src == ".")
    assert all(mount in c for c in installs)  # the project uploaded by file_mounts is what gets installed
    # Nothing comes from the caller's shell: no ${VAR} in the commands the nodes run.
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert not any("${" in c for c in cfg.get(key, [])), key


def test_aws_cluster_has_gpu_workers_and_a_cpu_head():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) > 0 and t["max_workers"] > 0 for t in types.values())


def test_constraints_pin_the_stack():
    pins = dict(ln.split("==", 1) for ln in (ROOT / "constraints.txt").read_text().splitlines()
                if ln and not ln.startswith("#"))
    assert {"torch", "torchvision", "ray", "optuna", "scikit-learn", "pyarrow", "duckdb"} <= set(pins)
    from importlib.metadata import version

    assert version("ray") == pins["ray"] and version("torch") == pins["torch"]  # CI installs with these pins


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("typo", [("setup_commands", "setup_comands"), ("provider", "provdier")])
def test_misspelt_key_fails_validation(name, typo):
    cfg = yaml.safe_load((ROOT / name).read_text())
    right, wrong = typo
    cfg[wrong] = cfg.pop(right)
    with pytest.raises((jsonschema.ValidationError, KeyError, ValueError)):
        _validate(cfg)


def test_readme_cluster_commands_parse_and_use_the_tested_flags():
    """The README's cluster recipe runs the densitune commands the tests exercise, with the same flags."""
    import shlex

    from densitune.cli import build_parser

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Cluster"):]
    block = section[section.index("```bash") + 7:section.index("```", section.index("```bash") + 7)]
    lines = block.replace("\\\n", " ").splitlines()
    commands = [shlex.split(ln.split(" -- ", 1)[1].split("#")[0]) if "job submit" in ln else shlex.split(ln.split("#")[0])
                for ln in lines if "densitune " in ln and ("job submit" in ln or ln.lstrip().startswith("densitune"))]
    assert [c[1] for c in commands if c[0] == "densitune"] == ["train", "search", "train", "report"]
    for cmd in commands:
        if cmd[0] == "densitune" and cmd[1] != "report":
            args = build_parser().parse_args(cmd[1:])
            assert args.address == "auto" and args.gpus_per_trial is not None
    outs = [build_parser().parse_args(cmd[1:]).out for cmd in commands if cmd[1] == "train"]
    assert outs[1].startswith("s3://")  # the bucket variant: tests/app/test_node_loss.py and tests/app/test_s3_run.py run it
    assert "ray up -y cluster.yaml" in block and "ray down -y cluster.yaml" in block
    assert "--working-dir ." in block


# ------------------------------------------------------------------ issue 24, Build 1: what a paid cluster needs

def _aws() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_every_worker_type_has_an_instance_profile():
    """Ray gives its S3-capable profile to the head only: each worker type names its own (bucket access)."""
    cfg = _aws()
    workers = {n: t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]}
    assert workers
    for name, t in workers.items():
        profile = t["node_config"].get("IamInstanceProfile") or {}
        assert set(profile) & {"Arn", "Name"} and all(profile.values()), name


def test_shared_folder_is_mounted_before_its_ownership_is_set():
    """A chown before the NFS mount is hidden by the mount (a new EFS root belongs to root)."""
    cmds = _aws()["setup_commands"]
    mount = next(i for i, c in enumerate(cmds) if "mount -t nfs" in c)
    target = cmds[mount].split()[-1]
    chowns = [i for i, c in enumerate(cmds) if "chown" in c and target in c]
    assert chowns and all(i > mount for i in chowns), cmds
    assert any("2049" in str(p) for p in _aws()["provider"]["security_group"]["IpPermissions"])  # NFS let in


@pytest.mark.process
@pytest.mark.parametrize("name", CONFIGS)
def test_install_goes_into_a_venv_made_by_a_checked_python(name):
    cfg = yaml.safe_load((ROOT / name).read_text())
    cmds = [" ".join(c.split()) for c in cfg["setup_commands"]]
    check = next(i for i, c in enumerate(cmds) if "sys.version_info >= (3, 11)" in c)
    venv_at = next(i for i, c in enumerate(cmds) if " -m venv " in c)
    venv = cmds[venv_at].split(" -m venv ")[1].split()[0]
    assert check < venv_at
    installs = [c for c in cmds if "pip install" in c]
    assert installs and all(c.startswith(f"{venv}/bin/python -m pip") for c in installs)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):  # Ray (and densitune) from the venv
        assert all(venv.removeprefix("~/") + "/bin" in c for c in cfg[key]), key
        assert any("RAY_AUTH_MODE=token" in c for c in cfg[key]), key  # token auth as Ray recommends
    # the check itself runs: this interpreter (>= 3.11) passes it
    import subprocess
    import sys

    line = cmds[check].replace("python3 -c", f"{sys.executable} -c", 1)
    assert subprocess.run(["bash", "-c", line], capture_output=True).returncode == 0  # noqa: S603


@pytest.mark.parametrize("name", CONFIGS)
def test_rsync_leaves_the_venv_and_git_at_home(name):
    """Ray's own rsync arguments for the config skip what .gitignore names (.venv, build) and .git."""
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    cfg = yaml.safe_load((ROOT / name).read_text())
    args = SSHCommandRunner._create_rsync_filter_args(None, {k: cfg.get(k) for k in ("rsync_filter", "rsync_exclude")})
    assert ["--filter", "dir-merge,- .gitignore"] == args[args.index("--filter"):args.index("--filter") + 2]
    excluded = [args[i + 1] for i, a in enumerate(args) if a == "--exclude"]
    assert "**/.git" in excluded and "**/.git/**" in excluded
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".venv/" in ignored and "build/" in ignored


def test_gpu_workers_check_the_driver_and_cuda():
    cfg = _aws()
    for t in cfg["available_node_types"].values():
        if t["resources"].get("GPU", 0) > 0:
            cmds = " ".join(t["worker_setup_commands"])
            assert "580" in cmds and "torch.cuda.is_available()" in cmds
