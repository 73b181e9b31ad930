"""The settings that fit the calibration data default by what that data is
(fgq_tvm.config.data_defaults, fgq_tvm.data.has_real_calibration, fgq_tvm.models.macs_per_image)."""

import json
from dataclasses import replace

import pytest
from helpers import fgq_tvm
from torch import nn

from fgq_tvm import cli
from fgq_tvm.config import (
    CALIB_IMAGES,
    NOISE_CALIB_IMAGES,
    RECONSTRUCTION_CALIB_IMAGES,
    RECONSTRUCTION_MAX_MACS,
    QuantConfig,
    data_defaults,
)
from fgq_tvm.data import CIFAR10_NPZ, data_dir, has_real_calibration
from fgq_tvm.models import ModelSpec, build_model, macs_per_image

RESNET20 = data_dir() / "cifar_resnet" / "resnet20-12fca82f.th"


def test_real_data_gets_the_best_method_and_reconstruction_up_to_the_bound():
    small = data_defaults(True, RECONSTRUCTION_MAX_MACS)
    assert small.quant_fields() == {"method": "gptq", "batchnorm": "correct",
                                    "reconstruction": "block"}  # fmt: skip
    assert small.note is None
    assert small.calib_images("block") == RECONSTRUCTION_CALIB_IMAGES
    assert small.calib_images("off") == CALIB_IMAGES
    large = data_defaults(True, 4_089_184_256)
    assert large.quant_fields() == {"method": "gptq", "batchnorm": "correct",
                                    "reconstruction": "off"}  # fmt: skip
    assert large.calib_images("off") == CALIB_IMAGES
    assert large.calib_images("block") == RECONSTRUCTION_CALIB_IMAGES
    assert "4.1 GMACs per image" in large.note and "--reconstruction block" in large.note


@pytest.mark.parametrize("macs", [1, 4_089_184_256])
def test_without_data_nothing_is_fitted(macs):
    defaults = data_defaults(False, macs)
    assert defaults.quant_fields() == {"method": "exact", "batchnorm": "keep",
                                       "reconstruction": "off"}  # fmt: skip
    assert defaults.calib_images("off") == defaults.calib_images("block") == NOISE_CALIB_IMAGES
    assert "--calib" in defaults.note and "\n" not in defaults.note
    assert QuantConfig(**defaults.quant_fields()).method == "exact"


def test_macs_count_every_conv_and_linear_layer():
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),  # 8 x 6 x 6 outputs, 4 * 3 * 3 MACs each
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4),  # 8 x 3 x 3 outputs, 2 * 3 * 3
        nn.Flatten(),
        nn.Linear(72, 10),
    )
    spec = ModelSpec("toy", (1, 4, 6, 6), (0.0,) * 4, (1.0,) * 4)
    assert macs_per_image(model, spec) == 288 * 36 + 72 * 18 + 72 * 10


def test_macs_of_a_fixed_batch_model_are_per_image():
    model, spec = build_model("cifar_resnet20")
    fixed = replace(spec, input_shape=(4, 3, 32, 32), fixed_batch=True)
    # 40,550,400 multiply-adds in the convs, 640 in the linear layer
    assert macs_per_image(model, fixed) == macs_per_image(model, spec) == 40_551_040


def test_real_calibration_is_a_file_or_the_cifar_split(monkeypatch, tmp_path):
    _, cifar = build_model("cifar_resnet20")
    _, imagenet = build_model("resnet18")
    monkeypatch.delenv("FGQ_TVM_DATA", raising=False)
    assert (data_dir() / CIFAR10_NPZ).is_file()
    assert has_real_calibration(None, cifar)
    assert not has_real_calibration(None, imagenet)
    assert has_real_calibration(tmp_path / "x.npy", imagenet)
    monkeypatch.setenv("FGQ_TVM_DATA", str(tmp_path))
    assert not has_real_calibration(None, cifar)


def model_inputs(capsys, *options):
    """``(quant, calibration images, warning lines)`` that ``fgq-tvm report cifar_resnet20``
    would quantize with, from the CLI's own wiring (no quantization runs)."""
    args = cli.build_parser().parse_args(["report", "cifar_resnet20", *map(str, options)])
    _, _, quant, _, calibration = cli._model_inputs(args)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    return (quant.method, quant.batchnorm, quant.reconstruction), len(calibration), warnings


def test_cli_defaults_follow_the_calibration_data(monkeypatch, capsys, tmp_path):
    fitting, images, warnings = model_inputs(capsys, "--weights", RESNET20)
    assert fitting == ("gptq", "correct", "block") and images == RECONSTRUCTION_CALIB_IMAGES
    assert len(warnings) == 1 and "CIFAR-10 images" in warnings[0]  # the split, no other note
    fitting, images, _ = model_inputs(capsys, "--reconstruction", "off")
    assert fitting == ("gptq", "correct", "off") and images == CALIB_IMAGES

    monkeypatch.setenv("FGQ_TVM_DATA", str(tmp_path))
    fitting, images, warnings = model_inputs(capsys)
    assert fitting == ("exact", "keep", "off") and images == NOISE_CALIB_IMAGES
    assert len(warnings) == 2
    assert f"calibrated on {NOISE_CALIB_IMAGES} random normal images" in warnings[0]
    assert "the defaults fit nothing" in warnings[1]
    given = ("--method", "gptq", "--batchnorm", "correct", "--reconstruction", "off")
    fitting, images, warnings = model_inputs(capsys, *given, "--calib-images", 8)
    assert fitting == ("gptq", "correct", "off") and images == 8
    assert len(warnings) == 1 and "fit nothing" not in warnings[0]


@pytest.mark.slow
def test_cli_reconstructs_blocks_by_default_with_calibration_data(tmp_path):
    result = fgq_tvm("report", "cifar_resnet20", "--weights", RESNET20, "--calib-images", 8,
                     "--out", tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "cifar_resnet20.json").read_text())["config"]
    assert config["reconstruction"] == "block"
    assert "quantize: reconstruct blocks" in result.stderr
    assert "unit 11/11 linear (1 layers): loss" in result.stderr


def test_cli_group_size_channel_is_all_channels_and_the_defaults_are_4_and_8_bits():
    parse = cli.build_parser().parse_args
    channel = cli._quant_fields(parse(["report", "cifar_resnet20", "--group-size", "channel"]))
    assert channel["group_size"] is None
    assert QuantConfig(**channel).group_size is None
    defaults = cli._quant_fields(parse(["report", "cifar_resnet20"]))
    assert (defaults["group_size"], defaults["act_bits"]) == (4, 8)
