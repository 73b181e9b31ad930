"""Error-compensating ternarization (fgq_tvm.quant.gptq)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fgq_tvm.config import QuantConfig
from fgq_tvm.quant import quantize
from fgq_tvm.quant.gptq import HessianObserver, ternarize_gptq
from fgq_tvm.quant.quantize import quantize_model
from fgq_tvm.quant.ternary import ternarize_groups

RNG = np.random.default_rng(0)
WEIGHT = RNG.normal(size=(8, 12, 3, 3))


def rows(weight: np.ndarray) -> np.ndarray:
    """``[K, C, R, S]`` as ``[K, D]`` in (r, s, c) column order."""
    return weight.transpose(0, 2, 3, 1).reshape(weight.shape[0], -1)


def test_hessian_columns_are_the_conv_inputs_in_r_s_c_order():
    conv = nn.Conv2d(12, 8, 3, stride=2, padding=1, bias=False).double()
    x = torch.randn(2, 12, 9, 7, dtype=torch.float64)
    observer = HessianObserver(conv, (1, 1))
    observer.observe(x)
    y = conv(x).permute(1, 0, 2, 3).reshape(8, -1).detach().numpy()
    weight = rows(conv.weight.detach().numpy())
    # ||W X||^2 / P from the Hessian equals the mean squared output
    energy = np.einsum("kd,de,ke->", weight, observer.result(), weight)
    np.testing.assert_allclose(energy, (y**2).sum() / y.shape[1], rtol=1e-6)  # float32 products


def test_uncorrelated_inputs_give_the_exact_solution():
    for asymmetric in (False, True):
        groups = ternarize_gptq(WEIGHT, np.eye(108), 4, asymmetric, damping=0.0)
        exact = ternarize_groups(WEIGHT, 4, asymmetric=asymmetric)
        np.testing.assert_array_equal(groups.values, exact.values)
        np.testing.assert_allclose(groups.positive, exact.positive, rtol=1e-6)
        assert groups.asymmetric == asymmetric
        if asymmetric:
            np.testing.assert_allclose(groups.negative, exact.negative, rtol=1e-6)


def test_correlated_inputs_lower_the_output_error():
    inputs = RNG.normal(size=(108, 108)) @ RNG.normal(size=(108, 4000))

    def output_error(groups):
        return np.sum((rows(WEIGHT - groups.dequantize()) @ inputs) ** 2)

    for asymmetric in (False, True):
        compensated = ternarize_gptq(WEIGHT, inputs @ inputs.T / 4000, 4, asymmetric)
        assert set(np.unique(compensated.values)) <= {-1, 0, 1}
        assert (compensated.positive >= 0).all()
        plain = ternarize_groups(WEIGHT, 4, asymmetric=asymmetric)
        assert output_error(compensated) < 0.8 * output_error(plain)


def test_quantize_model_with_compensation():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10),
    ).eval()  # fmt: skip
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    result = quantize_model(model, QuantConfig(method="gptq"), batches)
    ternary = [layer for layer in result.layers.values() if layer.is_ternary]
    assert len(ternary) == 2
    assert all(set(np.unique(layer.weight)) <= {-1, 0, 1} for layer in ternary)
    assert torch.isfinite(result.reference(batches[0])).all()


def test_one_pass_over_the_batches_per_run_of_layers():
    convs = [nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1) for i in range(8)]
    model = nn.Sequential(*[m for conv in convs for m in (conv, nn.ReLU())]).eval()
    batches = [torch.randn(2, 3, 6, 6) for _ in range(3)]
    calls = []
    convs[0].register_forward_pre_hook(lambda module, args: calls.append(1))

    def passes(method: str) -> int:
        calls.clear()
        quantize_model(model, QuantConfig(method=method, batchnorm="keep"), batches)
        return len(calls)

    ternary_layers = len(convs) - 2  # the first and the last stay int8
    runs = -(-ternary_layers // quantize.LAYERS_PER_PASS)
    assert passes("gptq") - passes("exact") == runs * len(batches)
