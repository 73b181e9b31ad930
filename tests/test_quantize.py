"""Tests of the quantization driver and the reference arithmetic."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomize_batchnorm
from torch import nn

from fgq_tvm.config import LayerConfig, LayerOverride, QuantConfig
from fgq_tvm.errors import FGQError
from fgq_tvm.quant.batchnorm import batchnorm_affine
from fgq_tvm.quant.layers import (
    ActQuant,
    QuantizedLayer,
    expand_groups,
    integer_conv,
    reference_forward,
)
from fgq_tvm.quant.quantize import ReferenceLayer, quantize_model
from fgq_tvm.quant.ternary import ternarize_groups


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(8, 10, 3, stride=2, padding="valid", bias=False)
        self.bn2 = nn.BatchNorm2d(10)
        self.same = nn.Conv2d(10, 6, 3, padding="same", dilation=2)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.reflect = nn.Conv2d(6, 6, 1, padding_mode="reflect")
        self.fc = nn.Linear(6, 5)
        self.unused = nn.Linear(5, 5)

    def forward(self, x):
        x = self.relu(self.bn(self.stem(x)))
        x = self.relu(self.bn2(self.conv(x)))
        x = self.reflect(self.depthwise(self.relu(self.same(x))))
        return self.fc(x.mean(dim=(2, 3)))


def relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    return ((expected - actual).norm() / expected.norm()).item()


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = randomize_batchnorm(SmallNet())
    return model, [torch.randn(4, 3, 12, 12) for _ in range(2)]


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(1)
    model = randomize_batchnorm(torchvision.models.resnet18(weights=None))
    return model, [torch.randn(4, 3, 32, 32) for _ in range(2)]


def test_small_net_layers(small):
    model, batches = small
    stages = []
    config = QuantConfig(scales="float")
    result = quantize_model(model, config, batches, progress=stages.append)
    assert stages == ["ternarize", "correct batchnorm", "calibrate", "fold batchnorm",
                      "build layers", "reference"]  # fmt: skip
    assert list(result.layers) == ["stem", "conv", "same", "fc"]
    assert result.float_layers == {
        "depthwise": "grouped conv",
        "reflect": "padding mode 'reflect'",
        "unused": "not reached by the calibration data",
    }
    stem, conv, same, fc = result.layers.values()
    assert stem.config.weights == "int8" and fc.config.weights == "int8"
    assert stem.act.signed and not conv.act.signed
    assert stem.weight.dtype == np.int8 and stem.weight.shape == (8, 3, 3, 3)
    assert stem.group_size == 3 and stem.group_scale is None and stem.group_scale_q is None
    assert stem.channel_scale.dtype == np.float32 and stem.channel_scale.shape == (8,)
    assert conv.is_ternary and conv.uses_group_scales and conv.channel_scale is None
    assert conv.weight.dtype == np.int8 and set(np.unique(conv.weight)) <= {-1, 0, 1}
    assert conv.group_scale.dtype == np.float32 and conv.group_scale.shape == (10, 2, 3, 3)
    assert (conv.stride, conv.padding, conv.dilation) == ((2, 2), (0, 0), (1, 1))
    assert (same.padding, same.dilation) == ((2, 2), (2, 2))
    assert fc.op == "linear" and fc.weight.shape == (5, 6, 1, 1)
    for layer in result.layers.values():
        assert layer.bias.dtype == np.float32 and layer.bias.shape == (layer.weight.shape[0],)
    assert isinstance(result.reference.conv, ReferenceLayer)
    assert isinstance(result.reference.depthwise, nn.Conv2d)
    assert isinstance(result.folded_model.bn, nn.Identity)


def test_int8_group_scales_are_the_default(small):
    model, batches = small
    result = quantize_model(model, QuantConfig(), batches)
    conv = result.layers["conv"]
    assert conv.group_scale is None and conv.group_scale_q.dtype == np.int8
    assert conv.group_scale_q.shape == (10, 2, 3, 3)
    assert conv.group_scale_q.min() >= 0 and conv.group_scale_q.max() == 127
    assert conv.channel_scale.dtype == np.float32 and conv.channel_scale.shape == (10,)
    assert torch.isfinite(result.reference(batches[0])).all()


def test_asymmetric_records_hold_a_scale_per_sign(small):
    model, batches = small
    config = QuantConfig(scales="int8-asymmetric", method="exact", batchnorm="keep")
    conv = quantize_model(model, config, batches).layers["conv"]
    assert conv.asymmetric_scales and conv.negative_scale_q.shape == conv.group_scale_q.shape
    folded = ternarize_groups(model.conv.weight, 4, "exact", asymmetric=True)
    folded = folded.folded(batchnorm_affine(model.bn2)[0])
    positive_q, negative_q, beta = folded.quantized_scales()
    np.testing.assert_array_equal(conv.weight, folded.values)
    np.testing.assert_array_equal(conv.group_scale_q, positive_q)
    np.testing.assert_array_equal(conv.negative_scale_q, negative_q)
    np.testing.assert_array_equal(conv.channel_scale, beta)
    assert not quantize_model(model, QuantConfig(), batches).layers["conv"].asymmetric_scales


def test_ternary_records_are_the_folded_ternarization(small):
    model, batches = small
    config = QuantConfig(scales="float", method="exact", batchnorm="keep")
    result = quantize_model(model, config, batches)
    folded = ternarize_groups(model.conv.weight, 4, "exact").folded(batchnorm_affine(model.bn2)[0])
    np.testing.assert_array_equal(result.layers["conv"].weight, folded.values)
    np.testing.assert_array_equal(result.layers["conv"].group_scale, folded.positive)
    same = ternarize_groups(model.same.weight, 4, "exact")
    np.testing.assert_array_equal(result.layers["same"].weight, same.values)
    np.testing.assert_array_equal(result.layers["same"].group_scale, same.positive)
    np.testing.assert_array_equal(result.layers["same"].bias, model.same.bias.detach().numpy())


def test_model_is_not_modified_and_folded_model_matches_it(small):
    model, batches = small
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = quantize_model(model, QuantConfig(), batches)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not result.folded_model.training and not result.reference.training
    no_reestimate = quantize_model(model, QuantConfig(batchnorm="keep"), batches)
    with torch.no_grad():
        assert relative_error(model(batches[0]), no_reestimate.folded_model(batches[0])) < 1e-5


def test_overrides_and_first_last_float(small):
    model, batches = small
    config = QuantConfig(first_last="float", overrides=(LayerOverride("same", group_size=None),))
    result = quantize_model(model, config, batches)
    assert result.float_layers["stem"] == "config: float"
    assert result.float_layers["fc"] == "config: float"
    same = result.layers["same"]
    assert same.group_size == 10 and same.group_scale_q.shape == (6, 1, 3, 3)


class RunsOnce(nn.Module):
    """Runs ``extra`` only on its first call: the layer drops out after the reachability pass."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.extra = nn.Conv2d(4, 4, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        x = self.conv(x)
        return self.extra(x) if self.calls == 1 else x


def test_layer_missing_during_calibration_stays_float():
    batches = [torch.randn(2, 3, 6, 6)]
    result = quantize_model(RunsOnce(), QuantConfig(batchnorm="keep"), batches)
    assert list(result.layers) == ["conv"]
    assert result.float_layers == {"extra": "not reached by the calibration data"}


def test_calibration_needs_batches(small):
    with pytest.raises(FGQError, match="calibration batch"):
        quantize_model(small[0], QuantConfig(), [])


def test_resnet18_layers(resnet18):
    """Which layers are quantized how (the closed-form ternarizer: the rule does not change
    them, and GPTQ would take 25 s of the suite here)."""
    model, batches = resnet18
    result = quantize_model(model, QuantConfig(method="exact"), batches)
    names = list(result.layers)
    assert len(names) == 21 and not result.float_layers
    assert names[0] == "conv1" and names[-1] == "fc"
    assert result.layers["conv1"].config.weights == "int8"
    assert result.layers["fc"].config.weights == "int8"
    assert result.layers["fc"].weight.shape == (1000, 512, 1, 1)
    downsample = result.layers["layer2.0.downsample.0"]
    assert downsample.is_ternary and downsample.group_scale_q.shape == (128, 16, 1, 1)
    assert downsample.stride == (2, 2)
    assert all(layer.is_ternary for layer in list(result.layers.values())[1:-1])
    assert torch.isfinite(result.reference(batches[0])).all()


@pytest.mark.parametrize("scales", ["float", "int8", "int8-asymmetric"])
def test_group_size_one_reference_is_close_to_the_float_model(resnet18, scales):
    """With N = 1 every weight is its own group: ternarization is lossless (and the int8 scales
    nearly so), so only the 8-bit activations separate the reference from the float model.
    (Lossless whatever the ternarizer: the closed-form one, as GPTQ has nothing to correct.)"""
    model, batches = resnet18
    config = QuantConfig(group_size=1, scales=scales, batchnorm="keep", method="exact")
    result = quantize_model(model, config, batches)
    with torch.no_grad():
        assert relative_error(model(batches[1]), result.reference(batches[1])) < 0.05


def loop_reference(layer: QuantizedLayer, x: np.ndarray) -> np.ndarray:
    """The layer arithmetic of DESIGN.md written out as loops, float64 then float32."""
    x_q = np.clip(np.rint(x / np.float32(layer.act.scale)), layer.act.qmin, layer.act.qmax)
    x_q = np.pad(x_q, ((0, 0), (0, 0)) + tuple((p, p) for p in layer.padding))
    batch, channels = x.shape[:2]
    k_dim, _, r_dim, s_dim = layer.weight.shape
    (sh, sw), (dh, dw) = layer.stride, layer.dilation
    out_h = (x_q.shape[2] - dh * (r_dim - 1) - 1) // sh + 1
    out_w = (x_q.shape[3] - dw * (s_dim - 1) - 1) // sw + 1
    y = np.zeros((batch, k_dim, out_h, out_w), dtype=np.float32)
    n = layer.group_size
    for b, k, oh, ow in itertools.product(range(batch), range(k_dim), range(out_h), range(out_w)):
        total = 0.0
        for g, r, s in itertools.product(range(-(-channels // n)), range(r_dim), range(s_dim)):
            chans = slice(g * n, (g + 1) * n)
            psum = int(
                (layer.weight[k, chans, r, s] * x_q[b, chans, oh * sh + r * dh, ow * sw + s * dw])
                .astype(np.int64)
                .sum()
            )
            if layer.uses_group_scales:
                total += float(layer.group_scale[k, g, r, s]) * psum
            elif layer.asymmetric_scales:
                t = layer.weight[k, chans, r, s].astype(np.int64)
                pixels = x_q[b, chans, oh * sh + r * dh, ow * sw + s * dw]
                total += int(layer.group_scale_q[k, g, r, s]) * int(pixels[t > 0].sum())
                total -= int(layer.negative_scale_q[k, g, r, s]) * int(pixels[t < 0].sum())
            else:
                scale = 1 if layer.group_scale_q is None else int(layer.group_scale_q[k, g, r, s])
                total += scale * psum
        if layer.uses_group_scales:
            value = np.float32(float(np.float32(layer.act.scale)) * total)
        else:
            value = np.float32(total) * layer.out_scale()[k]
        y[b, k, oh, ow] = value + layer.bias[k]
    return y


KINDS = ("float", "int8 scales", "int8", "asymmetric int8 scales")


def tiny_layer(kind: str) -> QuantizedLayer:
    rng = np.random.default_rng(KINDS.index(kind))
    weights = "int8" if kind == "int8" else "ternary"
    group_size = 5 if kind == "int8" else 2
    fields = {}
    if kind == "int8":
        fields["weight"] = rng.integers(-127, 128, (3, 5, 3, 3)).astype(np.int8)
    else:
        fields["weight"] = rng.integers(-1, 2, (3, 5, 3, 3)).astype(np.int8)
    if kind == "float":
        fields["group_scale"] = rng.uniform(0.1, 1.0, (3, 3, 3, 3)).astype(np.float32)
    else:
        fields["channel_scale"] = rng.uniform(0.01, 0.1, 3).astype(np.float32)
    if kind.endswith("int8 scales"):
        fields["group_scale_q"] = rng.integers(0, 128, (3, 3, 3, 3)).astype(np.int8)
    if kind == "asymmetric int8 scales":
        fields["negative_scale_q"] = rng.integers(0, 128, (3, 3, 3, 3)).astype(np.int8)
    return QuantizedLayer(
        name="tiny",
        op="conv2d",
        config=LayerConfig(weights=weights, group_size=group_size),
        act=ActQuant(scale=float(np.float32(0.05)), bits=8, signed=True),
        group_size=group_size,
        bias=rng.standard_normal(3).astype(np.float32),
        stride=(2, 1),
        padding=(1, 2),
        dilation=(1, 2),
        **fields,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_reference_forward_matches_a_loop(kind):
    layer = tiny_layer(kind)
    x = np.random.default_rng(9).standard_normal((2, 5, 6, 7)).astype(np.float32) * 3
    expected = loop_reference(layer, x)
    actual = reference_forward(layer, torch.from_numpy(x)).numpy()
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    if kind == "float":
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize(
    ("channels", "kernel", "weights", "route"),
    [
        (24, 3, 2, "whole weights"),  # sums of |w| small enough as they are
        (128, 3, 127, "split weights"),  # int8 weights: 16 * high + low
        (2048, 3, 127, "float64"),  # too wide even split: 18432 * 8 * 128 > 2^24
        (40, 7, 127, "split weights"),
    ],
)
def test_integer_sums_are_those_of_a_float64_convolution(
    channels, kernel, weights, route, monkeypatch
):
    """The reference's integer sums: float32 convolutions where no sum reaches 2^24 (checked),
    bit for bit the float64 ones, for either activation sign, strides, dilation, padding."""
    convolutions = []
    conv2d = F.conv2d

    def recorded(x, w, **geometry):
        convolutions.append(x.dtype)
        return conv2d(x, w, **geometry)

    rng = np.random.default_rng(channels)
    weight = rng.choice([-weights, weights], (5, channels, kernel, kernel))  # sum |w|: known
    for act, geometry in (
        (ActQuant(1.0, 8, signed=False), {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1)}),
        (ActQuant(1.0, 8, signed=True), {"stride": (2, 1), "padding": (0, 2), "dilation": (1, 2)}),
    ):
        layer = QuantizedLayer(
            name="conv", op="conv2d", config=LayerConfig("int8", channels), act=act,
            weight=weight.astype(np.int8), group_size=channels, bias=np.zeros(5, np.float32),
            **geometry,
        )  # fmt: skip
        x_q = torch.from_numpy(rng.integers(act.qmin, act.qmax + 1, (3, channels, 11, 12)))
        x_q = x_q.float()
        expected = F.conv2d(x_q.double(), torch.from_numpy(weight.astype(np.float64)), **geometry)
        with monkeypatch.context() as patch:
            patch.setattr(F, "conv2d", recorded)
            actual = integer_conv(x_q, weight, layer)
        assert actual.dtype == torch.float64 and torch.equal(actual, expected)
    routes = {"whole weights": [torch.float32], "split weights": [torch.float32] * 2,
              "float64": [torch.float64]}  # fmt: skip
    assert convolutions == routes[route] * 2


def test_reference_forward_linear():
    rng = np.random.default_rng(4)
    t = rng.integers(-1, 2, (3, 7, 1, 1)).astype(np.int8)
    alpha = rng.uniform(0.1, 1.0, (3, 2, 1, 1)).astype(np.float32)
    layer = QuantizedLayer(
        name="fc",
        op="linear",
        config=LayerConfig(group_size=4),
        act=ActQuant(scale=0.1, bits=8, signed=False),
        weight=t,
        group_size=4,
        bias=np.zeros(3, dtype=np.float32),
        group_scale=alpha,
    )
    x = rng.uniform(0, 20, (2, 7)).astype(np.float32)
    x_q = np.clip(np.rint(x / np.float32(0.1)), 0, 255)
    weight = t[:, :, 0, 0] * expand_groups(alpha, 4, 7)[:, :, 0, 0]
    expected = (x_q @ weight.T.astype(np.float64)) * float(np.float32(0.1))
    actual = reference_forward(layer, torch.from_numpy(x))
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-6)
