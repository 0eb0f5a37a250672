"""What ``densitune doctor`` learns on one node (:func:`densitune.run.node_probe.node_facts`), here in this process:
the installed versions, a probe file written and removed under ``--out``, why an ``--out`` or ``--data-root`` fails,
CUDA only asked where GPUs are offered (and faked only under the test-only switch)."""

from __future__ import annotations

import platform
from importlib.metadata import version
from pathlib import Path

from densitune.run.node_probe import FAKE_GPU_ENV, PROBE_PREFIX, node_facts


def test_versions_are_the_installed_distributions(tmp_path):
    import densitune

    facts = node_facts(None, None, 0.0)
    assert facts["python"] == platform.python_version()
    assert (facts["torch"], facts["ray"]) == (version("torch"), version("ray"))
    assert facts["densitune"] == densitune.__version__
    assert Path(facts["densitune_at"]) == Path(densitune.__file__).parent
    assert facts["cuda"] is None and facts["out_error"] is None and facts["data_root_error"] is None


def test_out_gets_a_probe_file_that_is_removed(tmp_path, monkeypatch):
    import os

    out = tmp_path / "runs" / "new-run"  # not there yet: the run would create it, the probe goes to tmp_path
    seen = []
    real_remove = os.remove

    def remove(path):  # record what the probe wrote before it goes
        seen.append(Path(path))
        real_remove(path)

    monkeypatch.setattr(os, "remove", remove)
    facts = node_facts(str(out), None, 0.0)
    monkeypatch.undo()
    assert facts["out_error"] is None
    assert len(seen) == 1 and seen[0].parent == tmp_path and seen[0].name.startswith(PROBE_PREFIX)
    assert list(tmp_path.iterdir()) == [] and not out.exists()
    assert set(facts["free"]) >= {str(tmp_path)} and facts["free"][str(tmp_path)] > 0


def test_an_unwritable_out_and_an_unreadable_data_root_say_why(tmp_path):
    (tmp_path / "afile").write_text("x")
    facts = node_facts(str(tmp_path / "afile" / "run"), str(tmp_path / "no-data"), 0.0)
    assert facts["out_error"] == f"{tmp_path / 'afile'} is not a folder"
    assert facts["data_root_error"] == "does not exist"
    assert node_facts(None, str(tmp_path / "afile"), 0.0)["data_root_error"] == "not a folder"
    assert node_facts(None, str(tmp_path), 0.0)["data_root_error"] is None


def test_cuda_is_asked_only_where_gpus_are_offered(monkeypatch):
    import torch

    monkeypatch.delenv(FAKE_GPU_ENV, raising=False)
    assert node_facts(None, None, 0.0)["cuda"] is None
    seen = node_facts(None, None, 1.0)["cuda"]
    assert (seen == "") != torch.cuda.is_available()  # "" (a problem) exactly when torch sees no CUDA
    monkeypatch.setenv(FAKE_GPU_ENV, "1")
    assert node_facts(None, None, 1.0)["cuda"] == "fake (test)"
