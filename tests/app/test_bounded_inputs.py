"""Bounded inputs: a YAML alias bomb, an oversized spec and huge values end in one short line, in real processes."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from densitune.errors import ConfigError
from densitune.search.spec_file import load_spec_file

#: The child's address-space limit.
LIMIT = 500 * 1024 * 1024

#: "Billion laughs": nine levels, each a list of nine aliases of the level below (9**9 leaves), 357 bytes or so.
BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{c}: &{c} [{','.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    + ["test_ood: *i", ""]
)


def _limit_memory() -> None:  # runs in the child, before exec
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def run_limited(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=300, preexec_fn=_limit_memory)


@pytest.mark.process
def test_alias_bomb_under_500_mb_is_one_line(tmp_path):
    spec = tmp_path / "bomb.yaml"
    spec.write_text(BOMB)
    assert len(BOMB) < 600
    p = run_limited([sys.executable, "-m", "densitune", "search", "--spec", str(spec), "--out", str(tmp_path / "run")], tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("densitune: error: ") and len(lines[0]) < 300, p.stderr[-2000:]
    assert "aliases" in lines[0] and str(spec) in lines[0]
    assert "MemoryError" not in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.process
def test_the_limit_is_real_plain_yaml_runs_out_of_memory(tmp_path):
    """Control: the same bomb through plain ``yaml.safe_load`` + ``repr`` (what the old error message did) dies
    under the same limit, so the test above passes because the loader refuses aliases, not because the limit is loose."""
    spec = tmp_path / "bomb.yaml"
    spec.write_text(BOMB)
    code = f"import yaml; d = yaml.safe_load(open({str(spec)!r})); print(len(repr(d)))"
    p = run_limited([sys.executable, "-c", code], tmp_path)
    assert p.returncode != 0 and "MemoryError" in p.stderr


def test_oversized_spec_is_refused_before_parsing(tmp_path):
    spec = tmp_path / "big.yaml"
    spec.write_text("test_ood: [" + ", ".join(["noise-uniform"] * 40000) + "]\n")  # ~600 KB of valid YAML
    with pytest.raises(ConfigError, match="larger than 256 KiB"):
        load_spec_file(spec)


@pytest.mark.parametrize("text", [
    "eps_grid: [" + ", ".join(["'x'"] * 20000) + "]\n",  # a long wrongly typed list
    "experiment: [" + ", ".join(["1"] * 20000) + "]\n",
    "x" * 100000 + ": 1\n",  # a huge unknown key
    "eps_range: [" + ", ".join(["0.1"] * 20000) + "]\n",
])
def test_echoed_values_are_capped(tmp_path, text):
    spec = tmp_path / "s.yaml"
    spec.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_spec_file(spec)
    message = str(info.value)
    assert len(message) < 200 + len(str(spec)) + 120 and "\n" not in message


def test_anchor_without_alias_and_plain_specs_still_load(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("experiment: &name e1\ntest_ood: [noise-uniform]\neps_grid: [0, 0.01]\n")
    assert load_spec_file(spec) == {"experiment": "e1", "test_ood": ["noise-uniform"], "eps_grid": [0, 0.01]}


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/densitune-pwned-ckpt",))


def test_malicious_checkpoint_is_refused_not_called_corrupt(tmp_path):
    import torch

    from densitune.errors import CheckpointError
    from densitune.trainables.train.checkpoint import read_checkpoint

    torch.save({"format": "densitune-checkpoint", "payload": _Evil()}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(tmp_path)
    message = str(info.value)
    assert message.startswith(f"refused checkpoint {tmp_path / 'model.pt'}") and "posix.system" in message
    assert "corrupt" not in message and "weights_only" not in message and "trusted source" not in message
    assert not Path("/tmp/densitune-pwned-ckpt").exists()
    (tmp_path / "model.pt").write_bytes(b"\x80\x04 not a checkpoint")  # plain garbage is still "corrupt"
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        read_checkpoint(tmp_path)
