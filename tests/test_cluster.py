"""cluster.yaml passes Ray's own cluster-config schema (and a typo would not)."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _validate(cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_cluster_yaml_is_valid():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    _validate(cfg)
    gpu = [t for t in cfg["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    assert gpu, "the cluster has GPU workers"
    assert any("pip install" in c and "densitune" in c for c in cfg["setup_commands"])


def test_typo_fails_validation():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg["head_node_typo"] = cfg.pop("head_node_type")
    with pytest.raises(jsonschema.ValidationError, match="'head_node_typo' was unexpected"):
        _validate(cfg)
