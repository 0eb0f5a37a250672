"""A full disk ends a run with one line naming the folder and ENOSPC, whichever library wrote; --resume then finishes.

Root only: each case mounts a small tmpfs in a private mount namespace (``unshare --mount``), fills it to a level
where a different write fails first (the session record, a result row, a checkpoint), runs ``densitune train``,
frees the space and runs the printed ``--resume`` command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.process,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")]

SCRIPT = r'''
set -eu
mnt="$1"; fill="$2"; py="$3"
mkdir -p "$mnt"
mount -t tmpfs -o size=4m tmpfs "$mnt"
head -c "$fill" /dev/zero > "$mnt/filler"
set +e
"$py" -m densitune train --out "$mnt/run" -D 4 --epochs 2 --train-limit 200 --num-cpus 1 -q 2> "$mnt/err1"
echo "rc1=$?"
rm -f "$mnt/filler"
"$py" -m densitune train --out "$mnt/run" -D 4 --epochs 2 --train-limit 200 --num-cpus 1 -q --resume 2> "$mnt/err2"
echo "rc2=$?"
echo "err1=$(cat "$mnt/err1" | "$py" -c 'import json,sys; print(json.dumps(sys.stdin.read()))')"
echo "err2=$(cat "$mnt/err2" | "$py" -c 'import json,sys; print(json.dumps(sys.stdin.read()))')"
"$py" - "$mnt/run" <<'PY'
import json, sys
import pyarrow.parquet as pq
from pathlib import Path
rows = [r for f in Path(sys.argv[1], "results").rglob("*.parquet") for r in pq.read_table(f).to_pylist()]
print("epochs=" + json.dumps(sorted(r["epoch"] for r in rows if r["stage"] == "train")))
PY
'''


@pytest.mark.parametrize("fill", [4_190_000, 4_100_000, 3_900_000])
def test_a_full_disk_is_one_line_and_resume_completes(tmp_path, fill):
    p = subprocess.run(["unshare", "--mount", "bash", "-c", SCRIPT, "full", str(tmp_path / "mnt"), str(fill), sys.executable],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    out = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    err1 = json.loads(out["err1"]).strip().splitlines()
    assert out["rc1"] == "2", err1
    assert len(err1) == 1 and "No space left on device" in err1[0] and str(tmp_path / "mnt" / "run") in err1[0], err1
    assert "Traceback" not in err1[0] and "enforce fail" not in err1[0]
    assert out["rc2"] == "0", json.loads(out["err2"])
    assert json.loads(out["epochs"]) == [1, 2]  # each epoch once
