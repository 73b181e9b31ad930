"""Tests of activation calibration in fgq_tvm.quant.calibration."""

import numpy as np
import pytest
import torch
from torch import nn

from fgq_tvm.errors import FGQError
from fgq_tvm.quant.calibration import calibrate_inputs, make_act_quant


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        x = self.conv2(self.relu(self.conv1(x)))
        return self.fc(x.mean(dim=(2, 3)))


NAMES = ["conv1", "conv2", "fc", "unused"]


@pytest.fixture
def net_and_batches():
    torch.manual_seed(0)
    return SmallNet(), [torch.randn(4, 3, 8, 8) for _ in range(3)]


def test_max_ranges_and_signedness(net_and_batches):
    net, batches = net_and_batches
    ranges = calibrate_inputs(net, NAMES, batches, "max")
    assert set(ranges) == {"conv1", "conv2", "fc"}
    images = torch.cat(batches)
    assert ranges["conv1"] == (images.min().item(), images.max().item())
    assert ranges["conv2"][0] >= 0.0 and ranges["conv2"][1] > 0.0
    assert make_act_quant(*ranges["conv1"], 8).signed
    assert not make_act_quant(*ranges["conv2"], 8).signed


def test_percentile_lies_inside_the_max_range(net_and_batches):
    net, batches = net_and_batches
    maxima = calibrate_inputs(net, NAMES, batches, "max")
    percentiles = calibrate_inputs(net, NAMES, batches, "percentile", 99.0)
    for name, (lo, hi) in percentiles.items():
        assert maxima[name][0] <= lo <= hi <= maxima[name][1]
    assert percentiles["conv1"][1] < maxima["conv1"][1]
    assert percentiles["conv2"][0] >= 0.0


def test_percentile_100_of_one_batch_is_the_max(net_and_batches):
    net, batches = net_and_batches
    assert calibrate_inputs(net, NAMES, batches[:1], "percentile", 100.0) == calibrate_inputs(
        net, NAMES, batches[:1], "max"
    )


def test_mode_and_hooks_are_restored(net_and_batches):
    net, batches = net_and_batches
    net.train()
    calibrate_inputs(net, NAMES, batches, "max")
    assert net.training
    assert all(not module._forward_pre_hooks for module in net.modules())


def test_bad_calibration_arguments(net_and_batches):
    net, batches = net_and_batches
    with pytest.raises(FGQError, match="at least one"):
        calibrate_inputs(net, NAMES, [], "max")
    with pytest.raises(FGQError, match="method"):
        calibrate_inputs(net, NAMES, batches, "entropy")
    with pytest.raises(FGQError, match="bits"):
        calibrate_inputs(net, NAMES, batches, "mse")
    with pytest.raises(FGQError, match="percentile"):
        calibrate_inputs(net, NAMES, batches, "percentile", 0.0)


def test_make_act_quant_scales():
    unsigned = make_act_quant(0.0, 5.1, 8)
    assert not unsigned.signed and unsigned.scale == float(np.float32(5.1 / 255))
    signed = make_act_quant(-3.0, 2.0, 8)
    assert signed.signed and signed.scale == float(np.float32(3.0 / 127))
    assert make_act_quant(-1.0, 7.0, 4).scale == float(np.float32(1.0))
    assert make_act_quant(0.0, 3.0, 4).scale == float(np.float32(0.2))
    for quant in (unsigned, signed):
        assert float(np.float32(quant.scale)) == quant.scale


def test_make_act_quant_guards():
    assert make_act_quant(0.0, 0.0, 8).scale == 1.0
    with pytest.raises(FGQError, match="finite"):
        make_act_quant(0.0, float("inf"), 8)


def _rounding_error(values: torch.Tensor, lo: float, hi: float, bits: int) -> float:
    act = make_act_quant(lo, hi, bits)
    return float(((act.quantize(values) * act.scale - values) ** 2).sum())


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_range_rounds_better_than_max(net_and_batches, bits):
    net, batches = net_and_batches
    widths = dict.fromkeys(NAMES, bits)
    maxima = calibrate_inputs(net, NAMES, batches, "max")
    mse = calibrate_inputs(net, NAMES, batches, "mse", bits=widths)
    for name, (lo, hi) in mse.items():
        assert maxima[name][0] <= lo <= hi <= maxima[name][1]
        assert make_act_quant(lo, hi, bits).signed == make_act_quant(*maxima[name], bits).signed
    images = torch.cat(batches)  # conv1's input: 768 values, all in the sample
    error, error_at_max = (
        _rounding_error(images, *ranges["conv1"], bits) for ranges in (mse, maxima)
    )
    assert error <= error_at_max
    if bits == 4:  # 15 levels for standard normal values: clipping near 2.5 beats 3.9
        assert mse["conv1"][1] < 0.8 * maxima["conv1"][1] and error < 0.8 * error_at_max
    assert mse == calibrate_inputs(net, NAMES, batches, "mse", bits=widths)  # fixed seed
