"""``fgq-tvm sweep`` on this machine: a real sweep killed with SIGKILL and resumed (issue 17).

The smallest real sweep: CIFAR ResNet-20 at two group sizes, no tuning trials, no
reconstruction, 32 calibration and 100 evaluation images.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import fgq_tvm, fgq_tvm_at_once
from rpc_servers import KEY, running_servers

from fgq_tvm.data import data_dir

WEIGHTS = data_dir() / "cifar_resnet" / "resnet20-12fca82f.th"
QUICK = ("--trials", "0", "--reconstruction", "off", "--calib-images", "32", "--images", "100",
         "--rounds", "3")  # fmt: skip

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"no {WEIGHTS}"),
]


def sweep_arguments(out, tuning_logs) -> list[str]:
    return ["sweep", f"cifar_resnet20={WEIGHTS}", "--group-sizes", "4,64", *QUICK,
            "--tuning-logs", str(tuning_logs), "--out", str(out)]  # fmt: skip


def test_a_sweep_killed_after_its_first_point_resumes_with_the_second(tmp_path):
    out, logs = tmp_path / "sweep", tmp_path / "tuning_logs"
    command = [sys.executable, "-m", "fgq_tvm", *sweep_arguments(out, logs)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    points = out / "points.jsonl"
    wait_for_points(process, points, 1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    first = points.read_text()
    assert len(first.splitlines()) == 1

    result = fgq_tvm(*sweep_arguments(out, logs))
    assert result.returncode == 0, result.stderr
    assert "1 of 2 points were done before" in result.stderr
    assert points.read_text().startswith(first) and len(points.read_text().splitlines()) == 2
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [row["point"] for row in rows] == ["cifar_resnet20 N=4 a8", "cifar_resnet20 N=64 a8"]
    for row in rows:
        assert float(row["latency (ms)"]) > 0 and row["error"] == ""
        assert -5 < float(row["drop (points)"]) < 30 and row["tuned kernels"].endswith("/10")
    assert all((out / "modules").glob("*.so.json"))
    assert (out / "sweep.png").read_bytes().startswith(b"\x89PNG")
    assert "| cifar_resnet20 N=64 a8 |" in result.stdout


@pytest.fixture
def servers(tmp_path_factory):
    with running_servers(tmp_path_factory.mktemp("rpc")) as servers:
        yield servers


def wait_for_points(process: subprocess.Popen, points, count: int) -> None:
    deadline = time.monotonic() + 240

    def finished() -> int:  # lines ended: a point appended whole
        return points.read_text().count("\n") if points.exists() else 0

    while finished() < count:
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, f"{count} point(s) took more than 4 minutes"
        time.sleep(0.2)


def test_a_sweep_on_rpc_servers_outlives_one_and_stops_resumably_without_any(servers, tmp_path):
    """A server killed after the first point: the second runs on the other. With no server
    left, the sweep stops with a line that says how to resume, its points kept."""
    out, logs = tmp_path / "sweep", tmp_path / "tuning_logs"
    remote = ["--rpc-tracker", servers.device.address, "--rpc-key", KEY]
    command = [sys.executable, "-m", "fgq_tvm", *sweep_arguments(out, logs), *remote]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_points(process, out / "points.jsonl", 1)
    servers.kill_server(0)
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [row["device"] for row in rows] == [servers.device.name] * 2
    assert all(float(row["latency (ms)"]) > 0 and row["error"] == "" for row in rows)
    assert servers.loaded(), "no module ran on the servers"

    servers.kill_server(1)
    arguments = sweep_arguments(out, logs)
    arguments[arguments.index("4,64")] = "4,64,16"
    result = fgq_tvm(*arguments, *remote)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"fgq-tvm: error: no RPC server under key {KEY} at {servers.device.address}; start one "
        f"with python -m tvm.exec.rpc_server --tracker {servers.device.address} --key {KEY}; "
        f"2 of 3 points are done in {out}: run the same command to resume"
    )
    assert len((out / "points.jsonl").read_text().splitlines()) == 2


def test_sweep_arguments_are_checked_before_any_work(tmp_path):
    weights, key, repeated = fgq_tvm_at_once(
        ("sweep", "cifar_resnet20=", "--out", tmp_path),
        ("sweep", "cifar_resnet20", "--rpc-key", "k", "--out", tmp_path),
        ("sweep", "cifar_resnet20", "--group-sizes", "4,4", "--out", tmp_path),
    )
    assert weights.returncode == 2 and "expected MODEL or MODEL=WEIGHTS" in weights.stderr
    assert key.returncode == 2 and "--rpc-key needs --rpc-tracker" in key.stderr
    result = repeated
    assert result.returncode == 1 and "repeat a value: [4, 4]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
