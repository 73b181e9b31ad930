"""fgq_tvm.float_peer: the TVM FP32 peer tuned by MetaSchedule's default rules, on a one-layer
model (one fused task, two trials: CI never tunes more than a smoke test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from torch import nn

from fgq_tvm.float_peer import build_float, float_module, float_tasks, tune_float, with_cores
from fgq_tvm.target import host_target, parse_target

HOST = with_cores(parse_target(host_target()), 2)
INPUT_SHAPE = (1, 3, 8, 8)


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    return model.eval()


def run(build, x: np.ndarray) -> np.ndarray:
    machine = tvm.relax.VirtualMachine(build.executable, tvm.cpu())
    output = machine["main"](tvm.runtime.tensor(x))
    return output[0].numpy() if not hasattr(output, "numpy") else output.numpy()


def record_lines(folder) -> int:
    return len((folder / "database_tuning_record.json").read_text().splitlines())


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tuning_logs") / "tvm-fp32"
    mod = float_module(toy_model(), INPUT_SHAPE)
    return mod, folder, tune_float(mod, HOST, trials=2, folder=folder)


def test_batchnorm_is_folded_and_every_task_is_tuned(tuned):
    mod, folder, results = tuned
    assert "batch_norm" not in mod.script()
    names = [task.task_name for task in float_tasks(mod, HOST)]
    assert [result.name for result in results] == names == ["fused_conv2d_add_relu"]
    assert all(0 < result.trials <= 2 and result.best_ms > 0 for result in results)
    assert record_lines(folder) >= len(names)


def test_tuning_again_skips_the_tasks_with_records(tuned):
    mod, folder, _ = tuned
    lines = record_lines(folder)
    again = tune_float(mod, HOST, trials=2, folder=folder)
    assert all(result.trials == 0 and result.best_ms > 0 for result in again)
    assert record_lines(folder) == lines


def test_tuned_and_untuned_builds_compute_the_model(tuned):
    mod, folder, results = tuned
    x = np.random.default_rng(0).standard_normal(INPUT_SHAPE).astype(np.float32)
    expected = toy_model()(torch.from_numpy(x)).detach().numpy()
    with_records = build_float(mod, HOST, folder)
    assert (with_records.tuned, with_records.tasks) == (len(results), len(results))
    without = build_float(mod, HOST, folder.parent / "missing")
    assert without.database is None
    for build in (with_records, without):
        np.testing.assert_allclose(run(build, x), expected, rtol=1e-4, atol=1e-5)
