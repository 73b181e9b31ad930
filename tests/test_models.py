"""Tests of the model zoo: building, strict weight loading, accuracy and export."""

from __future__ import annotations

import copy
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from fgq_tvm.data import data_dir, iterate_batches, load_npz_split
from fgq_tvm.errors import FGQError, UsageError
from fgq_tvm.models import CIFAR_DEPTHS, MODEL_NAMES, PadShortcut, build_model

CHECKPOINTS = {
    "cifar_resnet20": "resnet20-12fca82f.th",
    "cifar_resnet56": "resnet56-4bfd9763.th",
}


def checkpoint(name: str) -> Path:
    return data_dir() / "cifar_resnet" / CHECKPOINTS[name]


def one_line_error(error_type: type[Exception], *args: str | None) -> str:
    with pytest.raises(error_type) as info:
        build_model(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_builds_in_eval_mode(name: str) -> None:
    model, spec = build_model(name)
    assert not model.training
    assert spec.name == name
    side = 32 if name in CIFAR_DEPTHS else 224
    assert spec.input_shape == (1, 3, side, side)
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert spec.num_classes == (10 if name in CIFAR_DEPTHS else 1000)


@pytest.mark.parametrize("name", list(CIFAR_DEPTHS))
def test_cifar_resnets_run_and_count_layers(name: str) -> None:
    model, _ = build_model(name)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert len(layers) == CIFAR_DEPTHS[name]
    assert sum(isinstance(m, PadShortcut) for m in model.modules()) == 2


def test_unknown_model_is_a_usage_error_listing_the_names() -> None:
    message = one_line_error(UsageError, "resnet19")
    assert "resnet19" in message and "cifar_resnet20" in message and "vgg16" in message


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_real_checkpoints_load_strictly(name: str) -> None:
    model, spec = build_model(name, str(checkpoint(name)))
    saved = torch.load(checkpoint(name), map_location="cpu", weights_only=True)["state_dict"]
    state = model.state_dict()
    assert {f"module.{k}" for k in state if not k.endswith("num_batches_tracked")} == set(saved)
    for key, value in saved.items():
        torch.testing.assert_close(state[key.removeprefix("module.")], value, rtol=0, atol=0)
    assert spec.num_classes == 10 and not model.training


@pytest.mark.parametrize(("name", "minimum"), [("cifar_resnet20", 0.75), ("cifar_resnet56", 0.77)])
def test_fp32_accuracy_on_the_jpeg_eval_split(name: str, minimum: float) -> None:
    model, spec = build_model(name, str(checkpoint(name)))
    x, y = load_npz_split(data_dir() / "cifar10" / "cifar10_test_jpeg.npz", "eval", spec, 1000)
    with torch.inference_mode():
        logits = torch.cat([model(batch) for batch in iterate_batches(x, 250)])
    assert (logits.argmax(1) == y).float().mean().item() > minimum


def test_wrong_checkpoint_names_the_likely_model() -> None:
    message = one_line_error(FGQError, "cifar_resnet20", str(checkpoint("cifar_resnet56")))
    assert "cifar_resnet20" in message and "unexpected keys" in message
    assert "looks like a checkpoint for cifar_resnet56" in message


def test_shape_mismatch_is_reported(tmp_path: Path) -> None:
    state = build_model("cifar_resnet20")[0].state_dict()
    state["conv1.weight"] = torch.zeros(16, 3, 5, 5)
    torch.save(state, tmp_path / "bad.pt")
    message = one_line_error(FGQError, "cifar_resnet20", str(tmp_path / "bad.pt"))
    assert "1 shape mismatches" in message
    assert "conv1.weight (16, 3, 5, 5) vs (16, 3, 3, 3)" in message
    assert "looks like" not in message


def test_torchvision_checkpoint_for_another_model_is_named(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pt")
    message = one_line_error(FGQError, "resnet34", str(tmp_path / "r18.pt"))
    assert "missing keys" in message and "looks like a checkpoint for resnet18" in message


def test_fine_tuned_torchvision_checkpoint_sets_num_classes(tmp_path: Path) -> None:
    source = torchvision.models.alexnet(num_classes=10)
    torch.save({"model": source.state_dict()}, tmp_path / "alexnet10.pt")
    model, spec = build_model("alexnet", str(tmp_path / "alexnet10.pt"))
    assert spec.num_classes == 10
    torch.testing.assert_close(model.classifier[6].weight, source.classifier[6].weight)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix"])
def test_checkpoint_layouts(tmp_path: Path, wrap: str) -> None:
    source = build_model("cifar_resnet32")[0].state_dict()
    layouts = {
        "plain": source,
        "state_dict": {"state_dict": source, "epoch": 3},
        "model": {"model": source},
        "module_prefix": {f"module.{k}": v for k, v in source.items()},
    }
    torch.save(layouts[wrap], tmp_path / "ckpt.pt")
    model, _ = build_model("cifar_resnet32", str(tmp_path / "ckpt.pt"))
    torch.testing.assert_close(model.linear.weight, source["linear.weight"])


def test_missing_weights_file(tmp_path: Path) -> None:
    message = one_line_error(FGQError, "cifar_resnet20", str(tmp_path / "none.th"))
    assert "does not exist" in message


def test_corrupt_and_truncated_weights(tmp_path: Path) -> None:
    (tmp_path / "garbage.th").write_bytes(b"this is not a torch file" * 10)
    data = checkpoint("cifar_resnet20").read_bytes()
    (tmp_path / "truncated.th").write_bytes(data[: len(data) // 2])
    for name in ("garbage.th", "truncated.th"):
        message = one_line_error(FGQError, "cifar_resnet20", str(tmp_path / name))
        assert "cannot load weights file" in message


def test_a_raw_pickle_is_refused_in_one_line_without_warnings(tmp_path: Path) -> None:
    path = tmp_path / "raw.pkl"
    path.write_bytes(pickle.dumps({"conv1.weight": [1.0, 2.0]}, protocol=4))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert "cannot load weights file" in one_line_error(FGQError, "cifar_resnet20", str(path))
    assert not shown


@pytest.mark.parametrize(
    "key, value, problem",
    [
        ("bn1.running_var", float("inf"), "1 non-finite"),
        ("layer2.0.conv1.weight", float("nan"), "1 non-finite"),
        ("layer3.1.bn2.running_var", -1.0, "1 negative variances"),
    ],
)
def test_non_finite_weights_are_named(tmp_path: Path, key: str, value: float, problem: str) -> None:
    """Inf in a running variance compiled into a module that ignored its input; a NaN weight
    failed far from its cause, in activation calibration."""
    state = torch.load(checkpoint("cifar_resnet20"), map_location="cpu", weights_only=True)
    state = {name.removeprefix("module."): tensor for name, tensor in state["state_dict"].items()}
    state[key].view(-1)[0] = value
    torch.save(state, tmp_path / "bad.th")
    message = one_line_error(FGQError, "cifar_resnet20", str(tmp_path / "bad.th"))
    assert f"tensor {key!r} holds {problem}" in message


def test_non_finite_weights_in_a_pt2_are_named(tmp_path: Path, resnet20) -> None:
    model = copy.deepcopy(resnet20)
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = float("inf")
    path = tmp_path / "inf.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 3, 32, 32),)), path)
    assert "'conv1.weight' holds 1 non-finite" in one_line_error(FGQError, str(path))


def test_torch_file_without_state_dict(tmp_path: Path) -> None:
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    message = one_line_error(FGQError, "cifar_resnet20", str(tmp_path / "tensor.pt"))
    assert "holds no state dict" in message


@pytest.fixture(scope="module")
def resnet20() -> torch.nn.Module:
    return build_model("cifar_resnet20", str(checkpoint("cifar_resnet20")))[0]


@pytest.fixture(scope="module")
def exported(resnet20: torch.nn.Module) -> torch.export.ExportedProgram:
    return torch.export.export(resnet20, (torch.zeros(1, 3, 32, 32),))


def test_torch_export_matches_eager(resnet20, exported) -> None:
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), resnet20(x))


def test_fx_symbolic_trace(resnet20: torch.nn.Module) -> None:
    traced = torch.fx.symbolic_trace(resnet20)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), resnet20(x))


def test_pt2_round_trip(tmp_path: Path, resnet20, exported) -> None:
    path = tmp_path / "r20.pt2"
    torch.export.save(exported, path)
    model, spec = build_model(str(path))
    assert spec.name == "r20" and spec.input_shape == (1, 3, 32, 32) and spec.num_classes == 10
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), resnet20(x))
    assert "--weights" in one_line_error(UsageError, str(path), str(checkpoint("cifar_resnet20")))


def test_pt2_missing_or_corrupt(tmp_path: Path) -> None:
    assert "does not exist" in one_line_error(FGQError, str(tmp_path / "none.pt2"))
    (tmp_path / "bad.pt2").write_bytes(b"not a zip")
    assert "not an intact .pt2" in one_line_error(FGQError, str(tmp_path / "bad.pt2"))
