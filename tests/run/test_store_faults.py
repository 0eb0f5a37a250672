"""A bucket that refuses, stalls, slows, forgets or is shared (issue 28), against real moto S3 servers on loopback,
each its own process: the readers with wrong credentials or a missing bucket say so in one line (exit 2); the
per-request timeout bounds every call, and a first Ctrl-C ends a command stuck in one (slow: real processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import start_moto, stop_moto

pytestmark = [pytest.mark.slow, pytest.mark.process]

READERS = (("report",), ("best",), ("query", "SELECT count(*) AS n FROM results"), ("compact",))


def _cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "densitune", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


@pytest.fixture
def iam_server():
    """moto with its IAM checks on, one user allowed everything, and a bucket ``b`` holding one experiment's rows."""
    server = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "8"})  # the set-up's requests, then every one is checked
    try:
        import boto3

        iam = boto3.client("iam", endpoint_url=server.endpoint, aws_access_key_id="x", aws_secret_access_key="y",
                           region_name="us-east-1")
        iam.create_user(UserName="densitune")
        iam.put_user_policy(UserName="densitune", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="densitune")["AccessKey"]
        server.env.update(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
        boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=key["AccessKeyId"],
                     aws_secret_access_key=key["SecretAccessKey"], region_name="us-east-1").create_bucket(Bucket="bk-faults")
        wrong = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=key["AccessKeyId"],
                             aws_secret_access_key="wrong", region_name="us-east-1")
        for _ in range(10):  # use up the unchecked requests left
            try:
                wrong.list_objects_v2(Bucket="bk-faults")
            except Exception:  # noqa: BLE001 - refused: the checks are on
                break
        else:
            raise RuntimeError("moto does not check credentials")
        yield server
    finally:
        stop_moto(server)


def test_readers_with_wrong_credentials_or_a_missing_bucket_exit_2_with_one_line(tmp_path, iam_server):
    good = {**os.environ, **iam_server.env}
    env = {**good, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    for args in READERS:
        p = _cli(args[0], "s3://bk-faults/run", *args[1:], env=env, cwd=tmp_path)
        assert p.returncode == 2, (args, p.stderr[-2000:])
        lines = _lines(p.stderr)
        assert len(lines) == 1 and "Traceback" not in p.stderr, (args, p.stderr[-2000:])
        assert "refused the credentials (ACCESS_DENIED" in lines[0] and iam_server.endpoint in lines[0], lines[0]
        assert "not-the-secret" not in p.stderr + p.stdout
    for args in READERS:
        p = _cli(args[0], "s3://no-such-bucket/run", *args[1:], env=good, cwd=tmp_path)
        assert p.returncode == 2, (args, p.stderr[-2000:])
        lines = _lines(p.stderr)
        assert len(lines) == 1 and "s3://no-such-bucket/run" in lines[0], (args, p.stderr[-2000:])


def test_a_stuck_store_gives_up_within_its_budget_and_a_first_ctrl_c_ends_a_stuck_call(tmp_path, iam_server):
    """moto paused for good (SIGSTOP): a reader gives up by itself after its attempts of --storage-timeout, with
    one line naming the call and the endpoint; a writer stuck taking its lock ends at the first SIGINT."""
    env = {**os.environ, **iam_server.env}
    os.kill(iam_server.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        p = _cli("report", "s3://bk-faults/run", "--storage-timeout", "2", env=env, cwd=tmp_path)
        took = time.monotonic() - t0
        assert p.returncode == 2, p.stderr[-2000:]
        lines = _lines(p.stderr)
        assert len(lines) == 1 and iam_server.endpoint in lines[0], p.stderr[-2000:]
        assert took < 4 * 2 + 25 + 15, took  # its attempts and their backoff, plus the start of Python

        search = subprocess.Popen([sys.executable, "-m", "densitune", "search", "--out", "s3://bk-faults/run", "--models",
                                   str(tmp_path / "none"), "--experiment", "e"], env=env, cwd=tmp_path, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(12)  # past its imports, inside its first storage call
        assert search.poll() is None
        t0 = time.monotonic()
        search.send_signal(signal.SIGINT)
        _, err = search.communicate(timeout=60)
        assert time.monotonic() - t0 < 5, err[-2000:]
        assert search.returncode == 130, err[-2000:]
        assert "Traceback" not in err and len(_lines(err)) == 1, err[-2000:]
    finally:
        os.kill(iam_server.proc.pid, signal.SIGCONT)
