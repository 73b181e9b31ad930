"""Tests of ``.pt2`` models: their layers come back as modules that the quantizer can work on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomize_batchnorm
from torch import nn

from fgq_tvm.compiler import compile_model
from fgq_tvm.config import QuantConfig
from fgq_tvm.models import _with_layer_modules, build_model
from fgq_tvm.quant.quantize import quantize_model
from fgq_tvm.target import parse_target

LAYERS = (nn.Conv2d, nn.Linear)
REWRITTEN_OPS = {
    torch.ops.aten.conv2d.default,
    torch.ops.aten.convolution.default,
    torch.ops.aten.linear.default,
    torch.ops.aten.batch_norm.default,
    torch.ops.aten._native_batch_norm_legit_no_training.default,
}


def source_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":
        return randomize_batchnorm(torchvision.models.resnet18(weights=None))
    return randomize_batchnorm(build_model(name)[0])


def save_exported(model: nn.Module, side: int, path: Path, decompose: bool = False) -> Path:
    program = torch.export.export(model.eval(), (torch.zeros(1, 3, side, side),))
    torch.export.save(program.run_decompositions() if decompose else program, path)
    return path


@pytest.fixture(
    scope="module", params=[("cifar_resnet20", 32), ("resnet18", 224)], ids=lambda p: p[0]
)
def exported(request, tmp_path_factory) -> tuple[nn.Module, Path, int]:
    """The source model, its ``.pt2`` file and the input side."""
    name, side = request.param
    model = source_model(name)
    path = save_exported(model, side, tmp_path_factory.mktemp("pt2") / f"{name}.pt2")
    return model, path, side


def image(side: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def layer_names(model: nn.Module, types: tuple[type, ...] = LAYERS) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, types)}


def test_layers_become_modules_named_like_the_source(exported) -> None:
    source, path, _ = exported
    model, _ = build_model(str(path))
    assert not model.training and isinstance(model, torch.fx.GraphModule)
    calls = {node.target for node in model.graph.nodes if node.op == "call_function"}
    assert not calls & REWRITTEN_OPS
    types = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
    assert layer_names(model, types) == layer_names(source, types)
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    state = model.state_dict()
    assert state.keys() == source.state_dict().keys()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def test_output_matches_exported_program(exported) -> None:
    _, path, side = exported
    model, _ = build_model(str(path))
    x = image(side)
    with torch.no_grad():
        expected = torch.export.load(path).module()(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_can_be_exported_again(exported) -> None:
    _, path, side = exported
    model, _ = build_model(str(path))
    x = image(side)
    again = torch.export.export(model, (torch.zeros(1, 3, side, side),))
    with torch.no_grad():
        torch.testing.assert_close(again.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_quantizes_every_layer_and_folds_batchnorm(exported) -> None:
    """(The closed-form ternarizer: the rule does not change which layers are quantized, and
    GPTQ would take 25 s of the suite on ResNet-18.)"""
    source, path, side = exported
    model, _ = build_model(str(path))
    result = quantize_model(model, QuantConfig(method="exact"), [image(side, seed=2)])
    assert list(result.layers) and set(result.layers) == layer_names(source)
    assert result.float_layers == {}
    assert not layer_names(result.folded_model, (nn.BatchNorm2d,))
    assert all(layer.bias.any() for layer in result.layers.values())


def test_quantizes_like_the_source_model(tmp_path: Path) -> None:
    source = source_model("cifar_resnet20")
    model, _ = build_model(str(save_exported(source, 32, tmp_path / "r20.pt2")))
    calib = [image(32, seed=2)]
    ours, theirs = (quantize_model(m, QuantConfig(), calib) for m in (model, source))
    assert list(ours.layers) == list(theirs.layers)
    first, last = ours.layers["conv1"], ours.layers["linear"]
    assert first.config.weights == last.config.weights == "int8"
    x = image(32)
    with torch.no_grad():
        torch.testing.assert_close(ours.reference(x), theirs.reference(x), rtol=0, atol=0)


def test_decomposed_program(tmp_path: Path) -> None:
    """After ``run_decompositions``: ``convolution`` and ``_native_batch_norm_legit_no_training``
    with ``getitem`` become modules; the linear is ``permute`` + ``addmm`` and stays as it is."""
    source = source_model("cifar_resnet20")
    path = save_exported(source, 32, tmp_path / "decomposed.pt2", decompose=True)
    model, _ = build_model(str(path))
    assert layer_names(model) == layer_names(source, (nn.Conv2d,))
    assert not layer_names(model, (nn.BatchNorm2d,)) ^ layer_names(source, (nn.BatchNorm2d,))
    x = image(32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=1e-5, atol=1e-5)
    result = quantize_model(model, QuantConfig(), [image(32, seed=2)])
    assert set(result.layers) == layer_names(source, (nn.Conv2d,))


class Awkward(nn.Module):
    """A conv whose parent path holds another tensor, a top-level weight, a shared weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.conv.register_buffer("scale", torch.tensor(2.0))
        self.w = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.shared = nn.Parameter(torch.randn(4, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(self.conv(x) * self.conv.scale, self.w, stride=2)
        return F.conv2d(F.conv2d(y, self.shared), self.shared)


def test_names_defaults_and_untouched_ops() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    unlifted = torch.export.export(Awkward().eval(), (x,)).module()
    before = str(unlifted.graph)
    model = _with_layer_modules(unlifted)
    assert str(unlifted.graph) == before
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(convs) == {"conv_1", "w"}
    assert convs["w"].stride == (2, 2) and convs["w"].padding == (0, 0)
    assert convs["w"].dilation == (1, 1) and convs["w"].bias is None
    assert model.get_buffer("conv.scale") is unlifted.get_buffer("conv.scale")
    shared = [n for n in model.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert len(shared) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), unlifted(x), rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_pt2_matches_reference(tmp_path: Path) -> None:
    from fgq_tvm.runtime import load

    path = save_exported(source_model("cifar_resnet20"), 32, tmp_path / "r20.pt2")
    model, spec = build_model(str(path))
    calibration = image(32, seed=2, batch=8)
    target = parse_target("llvm")
    result = compile_model(model, spec, QuantConfig(), calibration, target, tmp_path / "m.so")
    assert len(result.quantized.layers) == 20 and not result.quantized.float_layers
    x = image(32)
    with torch.no_grad():
        expected = result.quantized.reference(x).numpy()
    actual = np.asarray(load(result.output)(x.numpy()))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
