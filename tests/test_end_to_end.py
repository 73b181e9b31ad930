"""Whole models through the compiler, checked against the PyTorch reference of the quantized net.

* The pretrained CIFAR ResNet-20 with the real calibration split, on all 5,000 eval images:
  logits within rtol/atol 1e-4 of the reference and the same top-1 on at least 99.9%.
* torchvision ResNet-18 (random weights) on random inputs, the same checks.
* The CIFAR ResNet-20 on 500 eval images in the 4-bit, N=64 variant of the 8-bit pipeline,
  built for an AVX2 CPU without VNNI (Haswell; the int16 dot core) and for one with VPOPCNTDQ
  but no VNNI (the popcount core on its 64-channel layers).
* ResNet-50 compiles in under 10 minutes.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from tvm.target import codegen

from fgq_tvm.compiler import compile_model
from fgq_tvm.config import QuantConfig, data_defaults
from fgq_tvm.data import data_dir, load_calibration, load_npz_split
from fgq_tvm.models import build_model
from fgq_tvm.runtime import load
from fgq_tvm.target import host_target, parse_target

TARGET = host_target()
EVAL_BATCH = 100

pytestmark = pytest.mark.slow


def compile_and_load(
    name, tmp_path, weights=None, calib=None, batch=1, target=TARGET, images=128, **config
):
    model, spec = build_model(name, weights)
    spec = replace(spec, input_shape=(batch, *spec.input_shape[1:]))
    calibration, _ = load_calibration(calib, spec, limit=images)
    result = compile_model(
        model, spec, QuantConfig(**config), calibration, parse_target(target), tmp_path / "m.so"
    )
    return load(result.output), result.quantized.reference, spec


def compare(compiled, reference, images: torch.Tensor, batch: int):
    """Fraction of images whose logits are all close, and fraction with the same top-1."""
    close = same_top1 = 0
    for start in range(0, images.shape[0], batch):
        x = images[start : start + batch]
        actual = compiled(x.numpy())
        with torch.no_grad():
            expected = reference(x).numpy()
        close += int(np.isclose(actual, expected, rtol=1e-4, atol=1e-4).all(axis=1).sum())
        same_top1 += int((actual.argmax(1) == expected.argmax(1)).sum())
    return close / images.shape[0], same_top1 / images.shape[0]


def test_cifar_resnet20_matches_reference_on_eval_split(tmp_path):
    weights = data_dir() / "cifar_resnet" / "resnet20-12fca82f.th"
    npz = data_dir() / "cifar10" / "cifar10_test_jpeg.npz"
    compiled, reference, spec = compile_and_load(
        "cifar_resnet20", tmp_path, weights=str(weights), calib=str(npz), batch=EVAL_BATCH
    )
    images, _ = load_npz_split(npz, "eval", spec)
    assert images.shape[0] == 5000
    close, same_top1 = compare(compiled, reference, images, EVAL_BATCH)
    assert close == 1.0
    assert same_top1 >= 0.999


def test_resnet18_matches_reference_on_random_inputs(tmp_path):
    # the kernels are under test, not the ternarizer: the fast one (gptq is the default)
    compiled, reference, spec = compile_and_load("resnet18", tmp_path, method="exact")
    images = torch.randn(4, *spec.input_shape[1:], generator=torch.Generator().manual_seed(0))
    close, same_top1 = compare(compiled, reference, images, 1)
    assert close == 1.0
    assert same_top1 == 1.0


def _runs_here(feature: str):
    """Skip where the host CPU cannot run code that uses ``feature``."""
    missing = not codegen.llvm_cpu_has_features([feature], parse_target(TARGET))
    return pytest.mark.skipif(missing, reason=f"the host CPU has no {feature}")


@pytest.mark.parametrize(
    ("target", "config"),
    [
        pytest.param(TARGET, {"group_size": 64, "act_bits": 4}, id="host-n64-a4"),
        pytest.param(TARGET, {"group_size": 4, "scales": "int8-asymmetric"}, id="asymmetric"),
        pytest.param(
            "llvm -mcpu=haswell", {"group_size": 4, "act_bits": 8},
            id="avx2", marks=_runs_here("avx2"),
        ),
        pytest.param(
            "llvm -mcpu=icelake-server -mattr=-avx512vnni", {"group_size": 64, "act_bits": 4},
            id="popcount", marks=_runs_here("avx512vpopcntdq"),
        ),
    ],
)  # fmt: skip
def test_int8_scale_pipeline_matches_reference(tmp_path, target, config):
    weights = data_dir() / "cifar_resnet" / "resnet20-12fca82f.th"
    npz = data_dir() / "cifar10" / "cifar10_test_jpeg.npz"
    compiled, reference, spec = compile_and_load(
        "cifar_resnet20", tmp_path, weights=str(weights), calib=str(npz), batch=50,
        target=target, **{"scales": "int8", **config},
    )  # fmt: skip
    images, _ = load_npz_split(npz, "eval", spec, limit=500)
    close, same_top1 = compare(compiled, reference, images, 50)
    assert close == 1.0
    assert same_top1 == 1.0


def test_resnet50_compiles_within_three_minutes_without_data(tmp_path):
    start = time.perf_counter()
    defaults = data_defaults(False, 0)  # what fgq-tvm compile resnet50 uses without --calib
    fields = defaults.quant_fields()
    images = defaults.calib_images(defaults.reconstruction)
    compiled, reference, spec = compile_and_load("resnet50", tmp_path, images=images, **fields)
    assert time.perf_counter() - start < 180  # 38 s on 2 idle Zen 4 cores
    image = torch.randn(1, *spec.input_shape[1:], generator=torch.Generator().manual_seed(1))
    close, same_top1 = compare(compiled, reference, image, 1)
    assert close == 1.0 and same_top1 == 1.0
