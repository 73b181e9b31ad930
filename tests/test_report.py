"""fgq-tvm report: the layer cost arithmetic, the paper's projected speed-up, and the command
with its group-size sweep on the real CIFAR-10 ResNet-20."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from helpers import fgq_tvm, ternary_conv_layer
from torch import nn

from fgq_tvm.config import LayerConfig
from fgq_tvm.data import CIFAR10_NPZ, data_dir
from fgq_tvm.report import (
    LayerCost,
    SpeedupModel,
    float_layer_cost,
    quantized_layer_cost,
)

RESNET20 = data_dir() / "cifar_resnet" / "resnet20-12fca82f.th"


def ternary_cost(group_size: int, act_bits: int = 8) -> LayerCost:
    channels = 64
    return LayerCost(
        "conv", "conv2d", "ternary", group_size, act_bits, macs=channels * 9 * 100,
        weight_count=channels * 9, multiplications_eliminated=1 - 1 / group_size,
        weight_bits=0, bias_count=0,
    )  # fmt: skip


def test_the_speedup_model_reproduces_the_papers_projections():
    model = SpeedupModel()
    assert 1 / model.time_per_mac(ternary_cost(4)) == pytest.approx(9.14, abs=0.01)
    assert 1 / model.time_per_mac(ternary_cost(64)) == pytest.approx(15.28, abs=0.01)
    assert 1 / model.time_per_mac(ternary_cost(1)) == pytest.approx(4.0)  # an int8 MAC each
    assert 1 / model.time_per_mac(ternary_cost(4, act_bits=4)) == pytest.approx(2 * 9.14, abs=0.1)
    int8 = replace(ternary_cost(4), weights="int8", multiplications_eliminated=0.0)
    assert 1 / model.time_per_mac(int8) == pytest.approx(4.0)
    float_layer = replace(int8, weights="float", act_bits=32)
    assert model.time_per_mac(float_layer) == 1.0
    # the model's speed-up weighs layers by their MACs: here half the MACs at 1x, half at 4x
    assert model.speedup([int8, float_layer]) == pytest.approx(2 / (1 + 1 / 4))


def test_ternary_layer_costs_count_groups_and_scales():
    float_scales = ternary_conv_layer(8, 10)  # groups of 4 over 10 channels: 3 groups
    cost = quantized_layer_cost(float_scales, outputs_per_image=25)
    weights = 8 * 10 * 9
    assert (cost.macs, cost.weight_count, cost.group_size) == (weights * 25, weights, 4)
    assert cost.multiplications_eliminated == pytest.approx(1 - 3 / 10)
    assert cost.weight_bits == 2 * weights + 32 * 8 * 3 * 9
    int8_scales = replace(
        float_scales,
        group_scale=None,
        group_scale_q=np.ones((8, 3, 3, 3), np.int8),
        channel_scale=np.ones(8, np.float32),
    )
    cost = quantized_layer_cost(int8_scales, outputs_per_image=25)
    assert cost.weight_bits == 2 * weights + 8 * 8 * 3 * 9 + 32 * 8
    assert cost.bits_per_weight == pytest.approx(cost.weight_bits / weights)
    asymmetric = replace(int8_scales, negative_scale_q=np.ones((8, 3, 3, 3), np.int8))
    cost = quantized_layer_cost(asymmetric, outputs_per_image=25)
    assert cost.multiplications_eliminated == pytest.approx(1 - 2 * 3 / 10)
    assert cost.weight_bits == 2 * weights + 2 * 8 * 8 * 3 * 9 + 32 * 8


def test_int8_and_float_layers_eliminate_nothing():
    int8 = replace(
        ternary_conv_layer(8, 10), config=LayerConfig("int8", None), group_size=10,
        group_scale=None, channel_scale=np.ones(8, np.float32),
    )  # fmt: skip
    cost = quantized_layer_cost(int8, outputs_per_image=4)
    assert (cost.weights, cost.group_size, cost.multiplications_eliminated) == ("int8", None, 0)
    assert cost.weight_bits == 8 * 720 + 32 * 8
    linear = float_layer_cost("fc", nn.Linear(16, 10), outputs_per_image=1)
    assert (linear.op, linear.macs, linear.weight_bits, linear.bias_count) == (
        "linear", 160, 32 * 160, 10,
    )  # fmt: skip


def test_bad_sweep_group_sizes_are_one_usage_error(tmp_path):
    result = fgq_tvm("report", "cifar_resnet20", "--sweep-group-sizes", "4,channel")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "'channel'" in lines[0], result.stderr


@pytest.mark.slow
def test_report_with_a_sweep_on_cifar10(tmp_path):
    result = fgq_tvm(
        "report", "cifar_resnet20", "--weights", RESNET20, "--data", data_dir() / CIFAR10_NPZ,
        "--images", 200, "--sweep-group-sizes", "1,64", "--sweep-act-bits", "8",
        "--reconstruction", "off", "--out", tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "cifar_resnet20.json").read_text())
    assert (tmp_path / "cifar_resnet20-sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "cifar_resnet20.md").read_text()
    assert markdown in result.stdout and "![top-1 against group size]" in markdown
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert len(layers) == 20 and layers["conv1"]["weights"] == "int8"
    assert layers["layer1.0.conv1"]["multiplications_eliminated"] == 0.75
    assert data["totals"]["macs"] == pytest.approx(40.6e6, rel=0.01)
    assert 0.12 < data["totals"]["model_bytes"] / data["fp32_bytes"] < 0.14  # N=4: 0.130
    n1, n64 = data["sweep"]
    assert (n1["group_size"], n64["group_size"]) == (1, 64)
    full = data["full_precision"]["top1"]
    assert abs(full - n1["accuracy"]["top1"]) <= 0.05  # a scale per weight: near-lossless
    assert n1["accuracy"]["top1"] > n64["accuracy"]["top1"]
    assert n64["multiplications_eliminated"] > 0.9 and n64["bits_per_weight"] < 2.5


def test_an_output_folder_that_is_a_file_is_one_error_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    result = fgq_tvm("report", "cifar_resnet20", "--out", tmp_path / "file" / "sub")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines == [
        f"fgq-tvm: error: cannot create the output folder {tmp_path}/file/sub (Not a directory)"
    ], result.stderr
