"""Tests of block-wise reconstruction (fgq_tvm.quant.reconstruction) and its place in the driver."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from helpers import randomize_batchnorm

from fgq_tvm.config import QuantConfig
from fgq_tvm.errors import FGQError, UsageError
from fgq_tvm.models import CifarResNet
from fgq_tvm.quant import quantize as quantize_module
from fgq_tvm.quant.batchnorm import fold_batchnorm
from fgq_tvm.quant.layers import reference_forward
from fgq_tvm.quant.quantize import quantize_model
from fgq_tvm.quant.reconstruction import LearnableLayer, ReconstructionConfig, reconstruct_blocks

FAST = ReconstructionConfig(iterations=20, batch_size=8)
RECORD_FIELDS = [field.name for field in dataclasses.fields(quantize_module.QuantizedLayer)]


@pytest.fixture(scope="module")
def resnet():
    """A CIFAR ResNet-8 (three BasicBlocks, one with a subsampling shortcut) on 8x8 inputs."""
    torch.manual_seed(0)
    model = randomize_batchnorm(CifarResNet(8))
    return model, [torch.randn(16, 3, 8, 8) for _ in range(2)]


def same_records(first: dict, second: dict) -> bool:
    """Whether two ``name -> QuantizedLayer`` dicts hold the same records, bit for bit."""
    if list(first) != list(second):
        return False
    for name, layer in first.items():
        for field in RECORD_FIELDS:
            a, b = getattr(layer, field), getattr(second[name], field)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if a is None or b is None or a.dtype != b.dtype or not np.array_equal(a, b):
                    return False
            elif a != b:
                return False
    return True


def output_error(result, model, batches) -> float:
    """Squared error of the reference model's logits against the float model's."""
    with torch.no_grad():
        return sum(float((result.reference(x) - model(x)).pow(2).sum()) for x in batches)


@pytest.mark.parametrize(
    ("scales", "group_size"), [("int8", 4), ("int8-asymmetric", 3), ("float", None), ("int8", 2)]
)
def test_records_keep_their_form(resnet, scales, group_size):
    model, batches = resnet
    config = QuantConfig(group_size=group_size, scales=scales)
    before = quantize_model(model, config, batches)
    after = quantize_model(model, dataclasses.replace(config, reconstruction="block"), batches,
                           reconstruction=FAST)  # fmt: skip
    assert list(after.layers) == list(before.layers)
    assert not same_records(after.layers, before.layers)
    for name, layer in after.layers.items():
        original = before.layers[name]
        assert layer.config == original.config and layer.act == original.act
        assert layer.group_size == original.group_size
        for field in ("weight", "group_scale", "group_scale_q", "negative_scale_q",
                      "channel_scale", "bias"):  # fmt: skip
            value, old = getattr(layer, field), getattr(original, field)
            assert (value is None) == (old is None), field
            if value is not None:
                assert value.dtype == old.dtype and value.shape == old.shape, field
        if layer.is_ternary:
            assert set(np.unique(layer.weight)) <= {-1, 0, 1}
        if layer.group_scale_q is not None:
            assert layer.group_scale_q.min() >= 0 and layer.channel_scale.min() > 0
        if layer.negative_scale_q is not None:
            assert layer.negative_scale_q.min() >= 0
        folded_bias = after.folded_model.get_submodule(name).bias.detach().numpy()
        np.testing.assert_array_equal(folded_bias, layer.bias)


def test_reconstruction_brings_the_output_closer_to_the_float_model(resnet):
    model, batches = resnet
    config = QuantConfig(group_size=8)
    before = quantize_model(model, config, batches)
    stages = []
    after = quantize_model(model, dataclasses.replace(config, reconstruction="block"), batches,
                           progress=stages.append, reconstruction=FAST)  # fmt: skip
    assert output_error(after, model, batches) < 0.9 * output_error(before, model, batches)
    assert stages[-8:-6] == ["build layers", "reconstruct blocks"] and stages[-1] == "reference"
    units = [line.split()[2] for line in stages if line.startswith("unit ")]
    assert units == ["conv1", "layer1.0", "layer2.0", "layer3.0", "linear"]


def test_block_losses_go_down(resnet):
    model, batches = resnet
    result = quantize_model(model, QuantConfig(group_size=8), batches)
    float_model = fold_batchnorm(copy.deepcopy(model).eval())
    lines = []
    reconstruct_blocks(result.layers, result.folded_model, float_model, batches, FAST,
                       progress=lines.append)  # fmt: skip
    losses = [(float(line.split()[-3]), float(line.split()[-1])) for line in lines]
    assert len(losses) == 5
    assert all(after <= before for before, after in losses)
    blocks = losses[1:4]
    assert all(after < before for before, after in blocks)


@pytest.mark.parametrize(
    "settings",
    [ReconstructionConfig(rounding=False, iterations=0), ReconstructionConfig(iterations=0)],
)
def test_each_step_alone_keeps_the_form(resnet, settings):
    model, batches = resnet
    config = QuantConfig(group_size=4, reconstruction="block")
    result = quantize_model(model, config, batches, reconstruction=settings)
    for layer in result.layers.values():
        if layer.is_ternary:
            assert set(np.unique(layer.weight)) <= {-1, 0, 1}


def test_off_leaves_the_result_unchanged(resnet, monkeypatch):
    model, batches = resnet
    config = QuantConfig(group_size=4, scales="int8-asymmetric")
    assert QuantConfig().reconstruction == "off"

    def unchanged(layers, *args, **kwargs):
        return dict(layers)

    monkeypatch.setattr(quantize_module, "reconstruct_blocks", unchanged)
    passed_through = quantize_model(
        model, dataclasses.replace(config, reconstruction="block"), batches
    )

    def refuse(*args, **kwargs):
        raise AssertionError("reconstruction ran although it is off")

    monkeypatch.setattr(quantize_module, "reconstruct_blocks", refuse)
    off = quantize_model(model, config, batches)
    assert same_records(off.layers, passed_through.layers)
    x = batches[0]
    with torch.no_grad():
        assert torch.equal(off.reference(x), passed_through.reference(x))
        assert torch.equal(off.folded_model(x), passed_through.folded_model(x))


@pytest.mark.parametrize("scales", ["int8", "int8-asymmetric", "float"])
def test_learnable_layer_round_trip_is_exact(resnet, scales):
    model, batches = resnet
    result = quantize_model(model, QuantConfig(group_size=4, scales=scales), batches)
    for layer in result.layers.values():
        module = LearnableLayer(layer)
        assert same_records({"x": module.export()}, {"x": layer})
        x = torch.randn(2, *((layer.weight.shape[1], 8, 8) if layer.op == "conv2d" else (64,)))
        with torch.no_grad():
            expected = reference_forward(layer, x)
            np.testing.assert_allclose(module(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("iterations", -1, "iterations >= 0"),
        ("batch_size", 0, "batch_size >= 1"),
        ("scale_lr", float("nan"), "scale_lr must be finite"),
        ("bias_lr", -1.0, "bias_lr must be finite and >= 0"),
        ("damping", float("inf"), "damping must be finite"),
        ("drop_probability", 1.0, "drop_probability must be in [0, 1)"),
    ],
)
def test_bad_settings_are_refused(field, value, message):
    with pytest.raises(FGQError, match=message.replace("[", r"\[").replace(")", r"\)")):
        ReconstructionConfig(**{field: value})


def test_bad_mode_and_missing_batches_are_refused(resnet):
    with pytest.raises(UsageError, match="unknown reconstruction 'layer': use off or block"):
        QuantConfig(reconstruction="layer")
    model, batches = resnet
    result = quantize_model(model, QuantConfig(), batches)
    with pytest.raises(FGQError, match="at least one calibration batch"):
        reconstruct_blocks(result.layers, result.folded_model, model, [])
