"""Remote tuning and timing through TVM's RPC tracker (fgq_tvm.remote): a tracker and two servers
on 127.0.0.1 in subprocesses, one small kernel tuned for a few trials through them, its
verification and comparison seen in the servers' logs; a compiled module run and timed on a
server; the one-line errors of a tracker without servers under the key and of no tracker.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from helpers import TINY_SHAPE, fgq_tvm, vnni_tuning_case, write_tiny_module
from rpc_servers import KEY, free_port, running_servers

from fgq_tvm.bench import BenchOptions
from fgq_tvm.errors import FGQError, UsageError
from fgq_tvm.remote import LOCAL, UPLOADED, LocalDevice, RemoteDevice
from fgq_tvm.runtime import load
from fgq_tvm.schedules.core import Epilogue
from fgq_tvm.schedules.intrinsics_x86 import has_vnni
from fgq_tvm.target import host_target, parse_target
from fgq_tvm.tuning import (
    COMPARISONS,
    Comparison,
    KernelTask,
    append_comparison,
    load_comparisons,
    tune,
)
from fgq_tvm.tuning_database import RECORDS

HOST = parse_target(host_target())
pytestmark = pytest.mark.skipif(not has_vnni(HOST), reason="the host CPU has no AVX-512 VNNI")

LAYER, SHAPE, SPEC, TASK = vnni_tuning_case()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    with running_servers(tmp_path_factory.mktemp("rpc")) as servers:
        yield servers


def _fail_here(*args, **kwargs):
    raise AssertionError("ran on this machine, not on the RPC servers")


@pytest.fixture(scope="module")
def tuned(servers, tmp_path_factory):
    """The task tuned for 2 trials through the servers, nothing allowed to run locally."""
    folder = tmp_path_factory.mktemp("tuning_logs") / "llvm-host"
    before = len(servers.loaded())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LocalDevice, "runner", _fail_here)
        patch.setattr(LocalDevice, "verify", _fail_here)
        patch.setattr(LocalDevice, "session", _fail_here)
        (result,) = tune([TASK], HOST, trials=2, folder=folder, device=servers.device)
    return folder, result, servers.loaded()[before:]


def _sessions(loaded: list[tuple[str, str]]) -> Counter:
    """How many fgq-tvm modules each session loaded (by its folder on the server)."""
    return Counter(folder for folder, name in loaded if name.startswith(UPLOADED))


def test_candidates_are_timed_verified_and_compared_on_the_servers(tuned, servers):
    folder, result, loaded = tuned
    assert result.trials >= 1 and result.best_ms is not None and result.rejected == 0
    records = (folder / RECORDS).read_text().splitlines()
    assert len(records) == result.trials  # every measured candidate, each verified best first
    candidates = [name for _, name in loaded if not name.startswith(UPLOADED)]
    assert len(candidates) >= result.trials  # MetaSchedule's RPC runner loaded each there
    # a verification loads the pack and the kernel; a comparison both kernels and their packs
    per_session = sorted(_sessions(loaded).values())
    assert per_session.count(4) == 1 and per_session.count(2) >= 1, loaded
    comparison = result.comparison
    assert comparison.device == servers.device.name == f"{KEY}@{servers.device.address}"
    assert load_comparisons(folder) == {(comparison.workload, comparison.trace): comparison}
    assert json.loads((folder / COMPARISONS).read_text())["device"] == servers.device.name


def test_verification_on_a_server_catches_other_arithmetic(servers):
    plain = replace(SPEC, epilogue=Epilogue()).kernels().layer
    with_relu = KernelTask(replace(SPEC, epilogue=Epilogue(relu=True)))
    with servers.device.session() as session:
        assert with_relu.verify(with_relu.spec.kernels().layer, HOST, session=session)
        assert not with_relu.verify(plain, HOST, session=session)
        assert session.uploads == 4


def test_a_module_runs_and_is_timed_on_a_server(servers, tmp_path):
    path = write_tiny_module(tmp_path / "tiny.so")
    x = np.random.default_rng(0).standard_normal(TINY_SHAPE).astype(np.float32)
    expected = load(path)(x)
    with servers.device.session() as session:
        model = session.load_model(path, x)
        np.testing.assert_array_equal(model.run(), expected)
        assert 0 < model.timer() < 1000
        assert session.threads() == 1  # the servers' TVM_NUM_THREADS
    assert LOCAL.load_model(path, x).timer is None  # the wall clock times it here


def test_peers_are_refused_on_a_remote_device(servers):
    with pytest.raises(UsageError, match="run on this machine only"):
        BenchOptions(peers=("torch",), device=servers.device)
    assert BenchOptions(peers=(), device=servers.device).device == servers.device


def test_a_key_without_servers_is_a_one_line_error(servers):
    start = time.monotonic()
    tracker = servers.device.address
    process = fgq_tvm("tune", "cifar_resnet20", "--rpc-tracker", tracker, "--rpc-key", "nobody")
    assert process.returncode == 1 and time.monotonic() - start < 60
    assert process.stderr.splitlines() == [
        f"fgq-tvm: error: no RPC server under key nobody at {tracker}; start one with "
        f"python -m tvm.exec.rpc_server --tracker {tracker} --key nobody"
    ]


def test_no_tracker_is_a_one_line_error():
    device = RemoteDevice("127.0.0.1", free_port(), KEY)
    start = time.monotonic()
    with pytest.raises(FGQError, match=r"^cannot reach the RPC tracker at 127\.0\.0\.1:\d+ .*"):
        device.servers()
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("tracker", ["localhost", "localhost:port", ":9190", "localhost:70000"])
def test_a_malformed_tracker_address_is_a_usage_error(tracker):
    with pytest.raises(UsageError, match="HOST:PORT"):
        RemoteDevice.parse(tracker, KEY)


def test_local_comparisons_keep_their_format_and_remote_ones_name_the_device(tmp_path):
    local = Comparison("00", "11", 1.0, 2.0)
    remote = Comparison("00", "22", 1.0, 2.0, device="k@host:9190")
    append_comparison(tmp_path, local)
    append_comparison(tmp_path, remote)
    lines = [json.loads(line) for line in (tmp_path / COMPARISONS).read_text().splitlines()]
    assert lines == [
        {"workload": "00", "trace": "11", "tuned_ms": 1.0, "default_ms": 2.0},
        {"workload": "00", "trace": "22", "tuned_ms": 1.0, "default_ms": 2.0,
         "device": "k@host:9190"},
    ]  # fmt: skip
    assert load_comparisons(tmp_path) == {("00", "11"): local, ("00", "22"): remote}
