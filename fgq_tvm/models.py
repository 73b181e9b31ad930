"""The model zoo: torchvision CNNs, the CIFAR-10 ResNets and exported ``.pt2`` programs.

:func:`build_model` is the single entry point. It returns the network in eval mode together with
a :class:`ModelSpec` that says which input the network expects and how to normalise it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .errors import FGQError, UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "alexnet", "vgg11", "vgg16")
CIFAR_DEPTHS = {f"cifar_resnet{depth}": depth for depth in (20, 32, 44, 56)}
MODEL_NAMES = TORCHVISION_MODELS + tuple(CIFAR_DEPTHS)

_MAX_NAMED_KEYS = 3


@dataclass(frozen=True)
class ModelSpec:
    """What a model expects as input.

    Attributes
    ----------
    name
        The model name (or the ``.pt2`` file's stem).
    input_shape
        The default NCHW input shape: batch 1, or the static batch a ``.pt2`` was exported with.
    mean, std
        Per-channel normalisation applied to pixels scaled to [0, 1].
    num_classes
        Number of output logits.
    """

    name: str
    input_shape: tuple[int, int, int, int]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    num_classes: int = 1000


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channels, half before, half after."""

    def __init__(self, pad_channels: int) -> None:
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = (0, 0, 0, 0, self.pad_channels, self.pad_channels)
        return F.pad(x[:, :, ::2, ::2], pad)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = PadShortcut((planes - in_planes) // 2)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR-10 ResNet of He et al. (2015, section 4.2): 6n+2 layers, option-A shortcuts.

    Parameters
    ----------
    depth
        Total number of weighted layers, ``6 * n + 2``.
    num_classes
        Number of output logits.
    """

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, blocks, stride=1)
        self.layer2 = self._stage(16, 32, blocks, stride=2)
        self.layer3 = self._stage(32, 64, blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))


def _classifier_key(name: str) -> str:
    """The state-dict key of the final layer's weight, whose first dim is the class count."""
    if name in CIFAR_DEPTHS:
        return "linear.weight"
    return "fc.weight" if name.startswith("resnet") else "classifier.6.weight"


def _num_classes(name: str, state_dict: Mapping[str, torch.Tensor] | None) -> int:
    """The class count of ``state_dict``'s final layer, or the model's default without one."""
    default = 10 if name in CIFAR_DEPTHS else 1000
    weight = None if state_dict is None else state_dict.get(_classifier_key(name))
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return default


def _construct(name: str, num_classes: int) -> nn.Module:
    if name in CIFAR_DEPTHS:
        return CifarResNet(CIFAR_DEPTHS[name], num_classes)
    builder: Callable[..., nn.Module] = getattr(torchvision.models, name)
    return builder(weights=None, num_classes=num_classes)


def _spec(name: str, num_classes: int) -> ModelSpec:
    side = 32 if name in CIFAR_DEPTHS else 224
    return ModelSpec(name=name, input_shape=(1, 3, side, side), num_classes=num_classes)


def _reason(exc: Exception) -> str:
    """The exception's type and first sentence, shortened, for a one-line error."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0].split('. ')[0][:100]}" if lines else type(exc).__name__


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in obj.items()
        )
    )


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict (plain or inside a checkpoint dict) and strip a ``module.`` prefix."""
    if not path.is_file():
        raise FGQError(f"weights file {path} does not exist; pass the path of a saved state dict")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FGQError(
            f"cannot load weights file {path} ({_reason(exc)}); pass a file written by "
            "torch.save(model.state_dict(), path)"
        ) from exc
    if isinstance(obj, dict):
        obj = obj.get("state_dict", obj.get("model", obj))
    if not _is_state_dict(obj):
        raise FGQError(
            f"weights file {path} holds no state dict; expected a dict of tensors or a checkpoint "
            "dict with a 'state_dict' or 'model' entry"
        )
    if all(key.startswith("module.") for key in obj):
        return {key.removeprefix("module."): value for key, value in obj.items()}
    return dict(obj)


def _shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Key -> shape, leaving out BatchNorm's ``num_batches_tracked`` (old checkpoints lack it)."""
    return {
        key: tuple(value.shape)
        for key, value in tensors.items()
        if not key.endswith("num_batches_tracked")
    }


def _matching_model(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The zoo model whose parameter names and shapes are exactly those of ``state_dict``."""
    wanted = _shapes(state_dict)
    for name in MODEL_NAMES:
        with torch.device("meta"):
            candidate = _construct(name, _num_classes(name, state_dict))
        if _shapes(candidate.state_dict()) == wanted:
            return name
    return None


def _few(keys: list[str]) -> str:
    more = f", ... {len(keys) - _MAX_NAMED_KEYS} more" if len(keys) > _MAX_NAMED_KEYS else ""
    return ", ".join(keys[:_MAX_NAMED_KEYS]) + more


def _mismatch_message(
    name: str, path: Path, model: nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> str | None:
    """One line describing how ``state_dict`` differs from ``model``, or None if it fits."""
    have, want = _shapes(state_dict), _shapes(model.state_dict())
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    wrong = [f"{k} {have[k]} vs {want[k]}" for k in want if k in have and have[k] != want[k]]
    if not (missing or unexpected or wrong):
        return None
    parts = [
        f"{len(items)} {label} ({_few(items)})"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected))
        if items
    ]
    if wrong:
        parts.append(f"{len(wrong)} shape mismatches (checkpoint vs model: {_few(wrong)})")
    guess = _matching_model(state_dict)
    advice = (
        f"looks like a checkpoint for {guess}: use that model name instead"
        if guess
        else "check that the model name is the architecture the checkpoint was trained for"
    )
    return f"weights {path} do not match {name}: {'; '.join(parts)}; {advice}"


def _load_weights(name: str, path: Path) -> tuple[nn.Module, int]:
    state_dict = _read_checkpoint(path)
    num_classes = _num_classes(name, state_dict)
    model = _construct(name, num_classes)
    message = _mismatch_message(name, path, model, state_dict)
    if message:
        raise FGQError(message)
    model.load_state_dict(state_dict, strict=True)
    return model, num_classes


def _meta_shape(node: torch.fx.Node) -> tuple[int | None, ...] | None:
    """The static shape recorded on an exported graph node; None for dynamic dims."""
    shape = getattr(node.meta.get("val"), "shape", None)
    if shape is None:
        return None
    return tuple(dim if isinstance(dim, int) else None for dim in shape)


def _exported_spec(program: torch.export.ExportedProgram, path: Path) -> ModelSpec:
    """Read the input shape and the class count from the exported graph's metadata."""
    signature = program.graph_signature
    nodes = list(program.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder" and n.name in signature.user_inputs]
    results = next(n for n in nodes if n.op == "output").args[0]
    outputs = [
        n for n in results if isinstance(n, torch.fx.Node) and n.name in signature.user_outputs
    ]
    in_shape = _meta_shape(inputs[0]) if len(inputs) == 1 else None
    out_shape = _meta_shape(outputs[0]) if len(outputs) == 1 else None
    if in_shape is None or len(in_shape) != 4 or None in in_shape[1:]:
        raise FGQError(
            f"{path}: expected one NCHW image input with static C, H and W; re-export the model "
            "with such an input"
        )
    if out_shape is None or out_shape[-1] is None:
        raise FGQError(f"{path}: expected one logits output with a static class count; re-export")
    batch = in_shape[0] or 1
    return ModelSpec(path.stem, (batch, *in_shape[1:]), num_classes=out_shape[-1])


def _load_exported(path: Path) -> tuple[nn.Module, ModelSpec]:
    """Load a ``torch.export.save`` file as a module and the spec its metadata describes."""
    if not path.is_file():
        raise FGQError(f"exported program {path} does not exist; write it with torch.export.save")
    try:
        program = torch.export.load(path)
    except Exception as exc:
        raise FGQError(
            f"cannot load exported program {path} ({_reason(exc)}); write it with torch.export.save"
        ) from exc
    return program.module(), _exported_spec(program, path)


def build_model(name: str, weights: str | None = None) -> tuple[nn.Module, ModelSpec]:
    """Build a zoo model, or load an exported program, in eval mode.

    Parameters
    ----------
    name
        One of :data:`MODEL_NAMES`, or the path of a ``.pt2`` file written by
        ``torch.export.save``.
    weights
        Optional state dict file (plain, or a checkpoint dict with a ``"state_dict"`` or
        ``"model"`` entry; a common ``module.`` prefix is stripped). It is loaded strictly;
        for torchvision and CIFAR models the class count is taken from its final layer.
        Without it, the weights are random. Not allowed with a ``.pt2`` file.

    Returns
    -------
    model, spec
        The network in eval mode and its :class:`ModelSpec`. Torchvision models never download
        anything. A ``.pt2`` file gives ``ExportedProgram.module()`` (which keeps the mode it was
        exported in) and a spec whose input shape (batch 1 if the batch is dynamic) and class
        count come from the exported graph's metadata, with the ImageNet mean and std.

    Raises
    ------
    UsageError
        Unknown model name, or ``weights`` given with a ``.pt2`` file.
    FGQError
        The weights or ``.pt2`` file is missing, unreadable or does not fit the model.
    """
    if name.endswith(".pt2"):
        if weights is not None:
            raise UsageError("--weights cannot be used with a .pt2 model; export it with weights")
        return _load_exported(Path(name))
    if name not in MODEL_NAMES:
        raise UsageError(
            f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)} or a .pt2 file"
        )
    if weights is None:
        num_classes = _num_classes(name, None)
        model = _construct(name, num_classes)
    else:
        model, num_classes = _load_weights(name, Path(weights))
    return model.eval(), _spec(name, num_classes)
