"""The model zoo: torchvision CNNs, the CIFAR-10 ResNets and exported ``.pt2`` programs.

:func:`build_model` is the single entry point. It returns the network in eval mode together with
a :class:`ModelSpec` that says which input the network expects and how to normalise it.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn

from .errors import FGQError, UsageError, brief
from .exported_archive import load_exported_program

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
    fixed_batch
        True when the model only runs at ``input_shape[0]`` (a ``.pt2`` exported with a static
        batch), so that calibration must use that batch size too.
    """

    name: str
    input_shape: tuple[int, int, int, int]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    num_classes: int = 1000
    fixed_batch: bool = False


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
        with warnings.catch_warnings():  # torch warns about pickles it then refuses
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FGQError(
            f"cannot load weights file {path} ({brief(exc)}); pass a file written by "
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
    return ModelSpec(
        path.stem,
        (batch, *in_shape[1:]),
        num_classes=out_shape[-1],
        fixed_batch=in_shape[0] is not None,
    )


_aten = torch.ops.aten
_CONVS = (_aten.conv2d.default, _aten.convolution.default)
_BATCH_NORMS = (_aten.batch_norm.default, _aten._native_batch_norm_legit_no_training.default)


@dataclass
class _Layer:
    """An op of an exported graph that becomes a call of ``module``.

    Attributes
    ----------
    node
        The ``call_function`` node of the op.
    module
        The module that computes it.
    base
        The preferred module path: that of the op's weight (``conv1.weight`` -> ``conv1``).
    params
        The ``get_attr`` nodes of the tensors that ``module`` now holds.
    outputs
        The nodes that the module call replaces: ``node`` itself, or the ``getitem(node, 0)``
        nodes of a batch norm that returns a tuple.
    """

    node: fx.Node
    module: nn.Module
    base: str
    params: list[fx.Node]
    outputs: list[fx.Node]


def _arguments(node: fx.Node) -> dict[str, object]:
    """The node's arguments by schema name, with the schema's defaults for omitted ones."""
    values = {}
    for index, argument in enumerate(node.target._schema.arguments):
        if index < len(node.args):
            values[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            values[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            values[argument.name] = argument.default_value
    return values


def _attribute(gm: fx.GraphModule, target: str) -> object:
    """The object that a ``get_attr`` target (a dotted path) names in ``gm``."""
    prefix, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(prefix), name)


def _tensors(
    gm: fx.GraphModule, node: fx.Node, args: list[object]
) -> list[torch.Tensor | None] | None:
    """The tensors of ``args`` (``None`` stays ``None``), if each is a get_attr used only here."""
    tensors = []
    for arg in args:
        if arg is None:
            tensors.append(None)
            continue
        if not (isinstance(arg, fx.Node) and arg.op == "get_attr" and list(arg.users) == [node]):
            return None
        value = _attribute(gm, arg.target)
        if not isinstance(value, torch.Tensor):
            return None
        tensors.append(value)
    return tensors


def _parameter(tensor: torch.Tensor) -> nn.Parameter:
    return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)


def _pair(value: object) -> tuple[int, int] | None:
    """A 2-d stride/padding/dilation as a pair; None if it is not one."""
    if isinstance(value, int):
        return (value, value)
    if not (isinstance(value, list | tuple) and all(isinstance(v, int) for v in value)):
        return None
    if len(value) == 1:
        return (value[0], value[0])
    return (value[0], value[1]) if len(value) == 2 else None


def _path(param: fx.Node) -> str:
    """The path of the parameter's parent module, or its own if it is top-level.

    ``conv1.weight`` -> ``conv1``, ``w`` -> ``w``.
    """
    parent, _, name = param.target.rpartition(".")
    return parent or name


def _params(args: Mapping[str, object], names: tuple[str, ...]) -> list[fx.Node]:
    """The get_attr nodes among the named arguments."""
    return [args[name] for name in names if args[name] is not None]


def _conv_layer(gm: fx.GraphModule, node: fx.Node) -> _Layer | None:
    """A non-transposed 2-d conv whose weight (and bias) are get_attr nodes, as nn.Conv2d."""
    args = _arguments(node)
    geometry = [_pair(args[name]) for name in ("stride", "padding", "dilation")]
    tensors = _tensors(gm, node, [args["weight"], args["bias"]])
    if args.get("transposed", False) or None in geometry or tensors is None:
        return None
    (weight, bias), groups = tensors, args["groups"]
    if weight.dim() != 4 or not isinstance(groups, int):
        return None
    stride, padding, dilation = geometry
    out_channels, in_channels, *kernel = weight.shape
    conv = nn.Conv2d(
        in_channels * groups,
        out_channels,
        tuple(kernel),
        stride,
        padding,
        dilation,
        groups,
        bias=bias is not None,
        device="meta",
    )
    conv.weight = _parameter(weight)
    if bias is not None:
        conv.bias = _parameter(bias)
    params = _params(args, ("weight", "bias"))
    return _Layer(node, conv, _path(args["weight"]), params, [node])


def _linear_layer(gm: fx.GraphModule, node: fx.Node) -> _Layer | None:
    """A linear op whose weight (and bias) are get_attr nodes, as nn.Linear."""
    args = _arguments(node)
    tensors = _tensors(gm, node, [args["weight"], args["bias"]])
    if tensors is None or tensors[0].dim() != 2:
        return None
    weight, bias = tensors
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = _parameter(weight)
    if bias is not None:
        linear.bias = _parameter(bias)
    params = _params(args, ("weight", "bias"))
    return _Layer(node, linear, _path(args["weight"]), params, [node])


def _batch_norm_outputs(node: fx.Node) -> list[fx.Node] | None:
    """The nodes computing the normalised tensor; None if the op's other outputs are used."""
    if node.target == _aten.batch_norm.default:
        return [node]
    users = list(node.users)
    if users and all(user.target is operator.getitem and user.args[1] == 0 for user in users):
        return users
    return None


def _sibling(gm: fx.GraphModule, path: str, name: str) -> object:
    """The attribute ``name`` of the submodule at ``path``; None if there is none."""
    try:
        return getattr(gm.get_submodule(path), name, None)
    except AttributeError:
        return None


def _is_4d(node: object) -> bool:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dim() == 4


def _batch_norm_layer(gm: fx.GraphModule, node: fx.Node) -> _Layer | None:
    """An inference batch norm of a 4-d tensor with get_attr statistics, as nn.BatchNorm2d."""
    args = _arguments(node)
    names = ("weight", "bias", "running_mean", "running_var")
    tensors = _tensors(gm, node, [args[name] for name in names])
    outputs = _batch_norm_outputs(node)
    if args.get("training", False) or tensors is None or outputs is None:
        return None
    weight, bias, mean, var = tensors
    if mean is None or var is None or (weight is None) != (bias is None):
        return None
    if not (_is_4d(args["input"]) or getattr(args["input"], "target", None) in _CONVS):
        return None
    affine = weight is not None
    bn = nn.BatchNorm2d(len(mean), args["eps"], args["momentum"], affine, dtype=mean.dtype)
    bn.running_mean, bn.running_var = mean, var
    if weight is not None:
        bn.weight, bn.bias = _parameter(weight), _parameter(bias)
    base = _path(args["weight"] if weight is not None else args["running_mean"])
    count = _sibling(gm, base, "num_batches_tracked")
    if isinstance(count, torch.Tensor) and count.dim() == 0:
        bn.num_batches_tracked = count
    return _Layer(node, bn, base, _params(args, names), outputs)


_LAYER_BUILDERS: dict[object, Callable[[fx.GraphModule, fx.Node], _Layer | None]] = {
    **dict.fromkeys(_CONVS, _conv_layer),
    _aten.linear.default: _linear_layer,
    **dict.fromkeys(_BATCH_NORMS, _batch_norm_layer),
}


def _free_name(base: str, taken: set[str]) -> str:
    """The first of ``base``, ``base_1``, ``base_2``, ... that does not clash with ``taken``.

    A path clashes if it is, lies inside or contains one of the paths in ``taken``.
    """

    def clashes(name: str) -> bool:
        return any(
            other == name or other.startswith(f"{name}.") or name.startswith(f"{other}.")
            for other in taken
        )

    name, suffix = base, 0
    while clashes(name):
        suffix += 1
        name = f"{base}_{suffix}"
    return name


def _replace(graph: fx.Graph, layer: _Layer, name: str) -> None:
    """Put a call of module ``name`` in place of the layer's op and drop its get_attr nodes."""
    with graph.inserting_before(layer.node):
        call = graph.call_module(name, (_arguments(layer.node)["input"],))
    call.meta = dict(layer.outputs[0].meta)
    for output in layer.outputs:
        output.replace_all_uses_with(call)
        graph.erase_node(output)
    if layer.node not in layer.outputs:
        graph.erase_node(layer.node)
    for param in layer.params:
        graph.erase_node(param)


def _put(root: nn.Module, path: str, value: object) -> None:
    """Set ``root``'s attribute at the dotted ``path``, creating empty parent modules as needed.

    A plain tensor becomes a buffer, anything else (a parameter or a module) an attribute.
    """
    *parents, name = path.split(".")
    for parent in parents:
        if not hasattr(root, parent):
            root.add_module(parent, nn.Module())
        root = getattr(root, parent)
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        root.register_buffer(name, value)
    else:
        setattr(root, name, value)


def _with_layer_modules(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite an unlifted exported graph so that its convs, linears and batch norms are modules.

    ``ExportedProgram.module()`` computes every layer with an ATen op on ``get_attr`` tensors,
    so the quantizer, which looks for ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm2d`` modules,
    finds nothing. Each ``aten.conv2d`` / non-transposed 2-d ``aten.convolution`` and
    ``aten.linear`` whose weight (and bias) are get_attr nodes used by nothing else becomes a call
    of an ``nn.Conv2d`` / ``nn.Linear`` holding those tensors, and each inference
    ``aten.batch_norm`` / ``aten._native_batch_norm_legit_no_training`` (only its ``getitem 0``
    used) of a 4-d tensor with get_attr parameters and statistics becomes an eval-mode
    ``nn.BatchNorm2d``. A module takes its weight's path (``layer1.0.conv1.weight`` ->
    ``layer1.0.conv1``), with a ``_1``, ``_2``, ... suffix if that path is taken. All other
    nodes, the pytree input/output handling and the ``_guards_fn`` call are kept as they are.

    Parameters
    ----------
    gm
        The graph module of ``ExportedProgram.module()``; not modified.

    Returns
    -------
    fx.GraphModule
        A new graph module in eval mode sharing ``gm``'s tensors, computing the same function.
    """
    graph = copy.deepcopy(gm.graph)
    for node in graph.find_nodes(op="get_attr"):
        if not node.users:
            graph.erase_node(node)
    layers = [
        layer
        for node in list(graph.nodes)
        if node.op == "call_function" and node.target in _LAYER_BUILDERS
        if (layer := _LAYER_BUILDERS[node.target](gm, node)) is not None
    ]
    consumed = {param for layer in layers for param in layer.params}
    taken = {
        node.target
        for node in graph.nodes
        if node.op in ("get_attr", "call_module") and node not in consumed
    }
    modules = {}
    for layer in layers:
        name = _free_name(layer.base, taken)
        taken.add(name)
        modules[name] = layer.module
        _replace(graph, layer, name)
    graph.lint()
    root = nn.Module()
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            target = node.target
            _put(root, target, modules[target] if target in modules else _attribute(gm, target))
    result = fx.GraphModule(root, graph)
    result.meta.update(gm.meta)
    return result.eval()


def _load_exported(path: Path) -> tuple[nn.Module, ModelSpec]:
    """Load a ``torch.export.save`` file as a module and the spec its metadata describes."""
    program = load_exported_program(path)
    return _with_layer_modules(program.module()), _exported_spec(program, path)


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
        anything. A ``.pt2`` file gives the graph module of ``ExportedProgram.module()`` with its
        convs, linears and inference batch norms turned into ``nn.Conv2d`` / ``nn.Linear`` /
        ``nn.BatchNorm2d`` modules named after their weights (see :func:`_with_layer_modules`;
        the other ops keep the mode the program was exported in), and a spec whose input shape
        (batch 1 if the batch is dynamic) and class count come from the exported graph's
        metadata, with the ImageNet mean and std. A program exported with a static batch only
        accepts inputs of that batch size.

    Raises
    ------
    UsageError
        Unknown model name, or ``weights`` given with a ``.pt2`` file.
    FGQError
        The weights or ``.pt2`` file is missing, unreadable or does not fit the model, a
        ``.pt2`` file holds content that would run code when loaded
        (:func:`~fgq_tvm.exported_archive.load_exported_program`), or a weight or BatchNorm
        statistic is not finite (:func:`check_finite`).
    """
    if name.endswith(".pt2"):
        if weights is not None:
            raise UsageError("--weights cannot be used with a .pt2 model; export it with weights")
        model, spec = _load_exported(Path(name))
        check_finite(model, name)
        return model, spec
    if name not in MODEL_NAMES:
        raise UsageError(
            f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)} or a .pt2 file"
        )
    if weights is None:
        num_classes = _num_classes(name, None)
        model = _construct(name, num_classes)
    else:
        model, num_classes = _load_weights(name, Path(weights))
        check_finite(model, weights)
    return model.eval(), _spec(name, num_classes)


def with_input_shape(
    model: nn.Module, spec: ModelSpec, input_shape: tuple[int, int, int, int]
) -> ModelSpec:
    """``spec`` with another input shape, once one forward pass of ``model`` took it.

    Parameters
    ----------
    model, spec
        The model and its spec (:func:`build_model`).
    input_shape
        The NCHW shape the model is to run at.

    Returns
    -------
    ModelSpec
        ``spec`` with ``input_shape``.

    Raises
    ------
    UsageError
        The model does not run at ``input_shape``.
    """
    try:
        with torch.no_grad():
            model(torch.zeros(input_shape))
    except Exception as error:  # the model's own shape checks raise various types
        raise UsageError(
            f"{spec.name} does not accept input shape {list(input_shape)} ({brief(error)}); "
            f"its default is {list(spec.input_shape)}"
        ) from None
    return replace(spec, input_shape=input_shape)


def layer_ops(model: nn.Module) -> dict[str, str]:
    """``module path -> "conv2d" | "linear"`` of the model's conv and linear layers, in order."""
    return {
        name: "conv2d" if isinstance(module, nn.Conv2d) else "linear"
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.Linear)
    }


def macs_per_image(model: nn.Module, spec: ModelSpec) -> int:
    """The multiply-adds of the model's conv and linear layers per image, counted by one
    forward pass of zeros (one image, or the fixed batch of a model that has one).

    Parameters
    ----------
    model
        The model (in eval mode; it is not modified).
    spec
        Its spec (input shape).

    Returns
    -------
    int
    """
    batch = spec.input_shape[0] if spec.fixed_batch else 1
    total = 0

    def count(module: nn.Module, args, output: torch.Tensor) -> None:
        nonlocal total
        per_output = module.weight[0].numel()  # conv: C/groups * R * S; linear: C
        total += per_output * output.numel()

    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    handles = [layer.register_forward_hook(count) for layer in layers]
    try:
        with torch.no_grad():
            model(torch.zeros(batch, *spec.input_shape[1:]))
    finally:
        for handle in handles:
            handle.remove()
    return total // batch


def check_finite(model: nn.Module, source: str) -> None:
    """Refuse weights and BatchNorm statistics that are not finite, and negative variances:
    quantization would carry them into every output without a word.

    Raises
    ------
    FGQError
        Naming the first such tensor of ``model`` (loaded from ``source``).
    """
    for key, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        what = f"{bad} non-finite values (NaN or Inf)"
        if not bad and key.endswith("running_var"):
            bad = int((tensor < 0).sum())
            what = f"{bad} negative variances"
        if bad:
            raise FGQError(
                f"{source}: tensor {key!r} holds {what} of {tensor.numel()}; fix the weights "
                "(a diverged training run or a damaged file?)"
            )
