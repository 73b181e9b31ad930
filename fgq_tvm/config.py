"""Quantization configuration: the global settings and the per-layer overrides.

A :class:`QuantConfig` is what ``fgq-tvm compile`` builds from its flags; :meth:`QuantConfig.
for_layer` resolves it into the :class:`LayerConfig` of one conv or linear layer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from .errors import UsageError

WeightMode = Literal["ternary", "int8", "float"]
ScaleMode = Literal["int8-asymmetric", "int8", "float"]
SCALE_MODES = ("int8-asymmetric", "int8", "float")
RECONSTRUCTION_MODES = ("off", "block")
METHODS = ("exact", "twn", "gptq")
BATCHNORM_MODES = ("correct", "reestimate", "keep")
CALIB_IMAGES = 256  # calibration images by default, when they are real
RECONSTRUCTION_CALIB_IMAGES = 2048  # the same when blocks are reconstructed by default
NOISE_CALIB_IMAGES = 32  # random images by default, when there is no calibration data
RECONSTRUCTION_MAX_MACS = 300_000_000  # per image: the largest model reconstructed by default

MAX_GROUP_SIZE = 64
SWEEP_GROUP_SIZES = (1, 2, 4, 8, 16, 32, 64)  # the group sizes `fgq-tvm report` sweeps
SWEEP_ACT_BITS = (8, 4)
ACT_BITS_CHOICES = (8, 4)
LAYER_NAMES_SHOWN = 5  # layer names an error about a --layer pattern shows


@dataclass(frozen=True)
class LayerConfig:
    """How one conv or linear layer is quantized.

    Attributes
    ----------
    weights
        ``"ternary"`` (FGQ groups), ``"int8"`` (8-bit weights, one scale per output channel) or
        ``"float"`` (left in full precision).
    group_size
        Input channels per ternary group; ``None`` means all input channels of the layer.
    act_bits
        Bits of the layer's input activations (8 or 4).
    scales
        ``"float"``: one float scale per group. ``"int8"``: group scales quantized to int8
        against one float scale per output channel (the full 8-bit pipeline).
        ``"int8-asymmetric"``: as ``"int8"`` with two scales per group, one for its positive
        and one for its negative weights (as in TTQ).
    """

    weights: WeightMode = "ternary"
    group_size: int | None = 4
    act_bits: int = 8
    scales: ScaleMode = "int8"

    @property
    def asymmetric_scales(self) -> bool:
        return self.scales == "int8-asymmetric"

    def resolved_group_size(self, in_channels: int) -> int:
        """The group size for a layer with ``in_channels`` input channels."""
        if self.group_size is None:
            return in_channels
        return min(self.group_size, in_channels)


@dataclass(frozen=True)
class LayerOverride:
    """A per-layer override: layers whose name matches ``pattern`` (fnmatch) take these fields.

    ``None`` fields keep the global setting.
    """

    pattern: str
    weights: WeightMode | None = None
    group_size: int | None | Literal["unset"] = "unset"
    act_bits: int | None = None

    def apply(self, config: LayerConfig) -> LayerConfig:
        changes: dict[str, object] = {}
        if self.weights is not None:
            changes["weights"] = self.weights
        if self.group_size != "unset":
            changes["group_size"] = self.group_size
            if self.weights is None:
                changes["weights"] = "ternary"
        if self.act_bits is not None:
            changes["act_bits"] = self.act_bits
        return replace(config, **changes)


@dataclass(frozen=True)
class QuantConfig:
    """The whole network's quantization settings.

    Attributes
    ----------
    group_size, act_bits, scales
        Defaults for every ternary layer (see :class:`LayerConfig`).
    method
        Ternarization rule: ``"gptq"`` (the default: the exact solver with each rounding error
        compensated on the layer's later weights, :mod:`fgq_tvm.quant.gptq`), ``"exact"``
        (the L2-optimal per-group solver alone) or ``"twn"`` (threshold 0.7 * mean |w|).
    first_last
        Weight mode of the first conv and the last linear layer (``"int8"`` by default).
    first_last_act_bits
        Activation bits of the first and the last layer.
    calibration
        ``"mse"`` (the default), ``"max"`` or ``"percentile"`` activation range estimation
        (:mod:`fgq_tvm.quant.calibration`).
    percentile
        The percentile used when ``calibration == "percentile"``.
    batchnorm
        What happens to the BatchNorm statistics of the quantized network before they are
        folded into the convs: ``"correct"`` (the trained statistics shifted and scaled by the
        change quantization causes on the calibration data,
        :func:`~fgq_tvm.quant.batchnorm.correct_batchnorm`), ``"reestimate"`` (measured anew
        on the calibration data) or ``"keep"`` (the trained statistics).
    reconstruction
        ``"block"``: after BatchNorm is folded, revisit the network one residual block (or
        other layer) at a time and re-solve its ternary rounding, scales and biases against
        the full-precision block's output on the calibration data
        (:mod:`fgq_tvm.quant.reconstruction`); ``"off"``: keep the layers as solved.
    overrides
        Per-layer overrides, applied in order after the first/last policy.
    """

    group_size: int | None = 4
    act_bits: int = 8
    scales: ScaleMode = "int8"
    method: Literal["exact", "twn", "gptq"] = "gptq"
    first_last: WeightMode = "int8"
    first_last_act_bits: int = 8
    calibration: Literal["max", "percentile", "mse"] = "mse"
    percentile: float = 99.99
    batchnorm: Literal["correct", "reestimate", "keep"] = "correct"
    reconstruction: Literal["off", "block"] = "off"
    overrides: tuple[LayerOverride, ...] = ()

    def __post_init__(self) -> None:
        if self.reconstruction not in RECONSTRUCTION_MODES:
            raise UsageError(
                f"unknown reconstruction {self.reconstruction!r}: use "
                f"{' or '.join(RECONSTRUCTION_MODES)}"
            )

    def for_layer(self, name: str, *, is_first: bool, is_last: bool) -> LayerConfig:
        """The configuration of the layer called ``name`` (its module path in the model)."""
        config = LayerConfig("ternary", self.group_size, self.act_bits, self.scales)
        if is_first or is_last:
            config = replace(config, weights=self.first_last, act_bits=self.first_last_act_bits)
        for override in self.overrides:
            if fnmatch.fnmatchcase(name, override.pattern):
                config = override.apply(config)
        return config

    def check_overrides(self, names: Sequence[str]) -> None:
        """Refuse an override whose pattern matches none of ``names``, the module paths of the
        model's conv and linear layers (a misspelt pattern would change nothing, silently).

        Raises
        ------
        UsageError
            An override matches no layer.
        """
        for override in self.overrides:
            if not any(fnmatch.fnmatchcase(name, override.pattern) for name in names):
                shown = ", ".join(names[:LAYER_NAMES_SHOWN])
                more = f", ... ({len(names)} in all; 'fgq-tvm report' lists them)"
                raise UsageError(
                    f"--layer pattern {override.pattern!r} matches no conv or linear layer of "
                    f"the model: {shown}{more if len(names) > LAYER_NAMES_SHOWN else ''}"
                )

    def summary(self) -> dict[str, object]:
        """The settings a reader of a result needs, as JSON-ready values."""
        return {
            "group_size": self.group_size if self.group_size is not None else "channel",
            "act_bits": self.act_bits,
            "scales": self.scales,
            "method": self.method,
            "first_last": self.first_last,
            "calibration": self.calibration,
            "batchnorm": self.batchnorm,
            "reconstruction": self.reconstruction,
        }


@dataclass(frozen=True)
class DataDefaults:
    """What the settings that fit the calibration data default to, given that data.

    Attributes
    ----------
    real_data
        Whether the calibration images are real.
    method, batchnorm, reconstruction
        Defaults of :class:`QuantConfig`'s fields of those names.
    note
        One line that says why the defaults are not the best method, or None when they are.
    """

    real_data: bool
    method: Literal["exact", "twn", "gptq"]
    batchnorm: Literal["correct", "reestimate", "keep"]
    reconstruction: Literal["off", "block"]
    note: str | None = None

    def calib_images(self, reconstruction: str) -> int:
        """Most calibration images to load for a configuration whose reconstruction is
        ``reconstruction``: :data:`NOISE_CALIB_IMAGES` random ones without real data, else
        :data:`RECONSTRUCTION_CALIB_IMAGES` for block reconstruction (fewer let the scales
        overfit: ResNet-20 at N=64 dropped 2.6 to 3.0 points with 256 images, 2.2 with 1,024;
        at N=4, 2,048 images brought its KL divergence from the full-precision model 4% below
        1,024's on held-out calibration images, in two seeds), else :data:`CALIB_IMAGES`."""
        if not self.real_data:
            return NOISE_CALIB_IMAGES
        return RECONSTRUCTION_CALIB_IMAGES if reconstruction == "block" else CALIB_IMAGES

    def quant_fields(self) -> dict[str, str]:
        """The :class:`QuantConfig` fields these defaults set."""
        return {
            "method": self.method,
            "batchnorm": self.batchnorm,
            "reconstruction": self.reconstruction,
        }


def data_defaults(real_data: bool, macs_per_image: int) -> DataDefaults:
    """The defaults of the settings that fit the calibration data.

    With real images: GPTQ and BatchNorm correction; when the model has at most
    :data:`RECONSTRUCTION_MAX_MACS` multiply-adds per image (CIFAR-scale models, where it takes
    one to a few minutes on two cores; on ImageNet models it would take tens of minutes, so
    there it is opt-in), block reconstruction too. Without (random normal images stand in):
    nothing to fit, so the exact solver, the trained BatchNorm statistics and no
    reconstruction; the images (:meth:`DataDefaults.calib_images`) set the activation ranges
    only.

    Parameters
    ----------
    real_data
        Whether the calibration images are real (a ``--calib`` file or the CIFAR-10 split).
    macs_per_image
        The model's multiply-adds per image (:func:`fgq_tvm.models.macs_per_image`).

    Returns
    -------
    DataDefaults
    """
    if not real_data:
        return DataDefaults(
            False, "exact", "keep", "off",
            "without calibration data the defaults fit nothing: the exact solver, the trained "
            "BatchNorm statistics, no reconstruction; --calib with real images brings gptq and "
            "BatchNorm correction",
        )  # fmt: skip
    if macs_per_image <= RECONSTRUCTION_MAX_MACS:
        return DataDefaults(True, "gptq", "correct", "block")
    return DataDefaults(
        True, "gptq", "correct", "off",
        f"block reconstruction is off for a model of {macs_per_image / 1e9:.1f} GMACs per image "
        "(tens of minutes on a few cores); --reconstruction block turns it on",
    )  # fmt: skip


def parse_group_size(text: str) -> int | None:
    """Parse ``--group-size``: an integer in 1..64 or ``channel`` (returned as ``None``)."""
    if text == "channel":
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(
            f"group size {text!r} is not a number: use an integer 1..{MAX_GROUP_SIZE} or 'channel'"
        ) from None
    if not 1 <= value <= MAX_GROUP_SIZE:
        raise UsageError(
            f"group size {value} is out of range: use an integer 1..{MAX_GROUP_SIZE} or 'channel'"
        )
    return value


def parse_act_bits(text: str) -> int:
    """Parse ``--act-bits``: 8 or 4."""
    if text not in {str(bits) for bits in ACT_BITS_CHOICES}:
        raise UsageError(f"activation bits {text!r} are not supported: use 8 or 4")
    return int(text)


def parse_override(text: str) -> LayerOverride:
    """Parse ``--layer PATTERN=SPEC[,SPEC...]``.

    Each SPEC is a group size (``1``..``64`` or ``channel``), a weight mode (``ternary``,
    ``int8``, ``float``) or activation bits (``a8``, ``a4``). Example: ``layer4.*=16,a8``.
    """
    pattern, sep, specs = text.partition("=")
    if not sep or not pattern or not specs:
        raise UsageError(
            f"layer override {text!r} is malformed: use PATTERN=SPEC[,SPEC], e.g. 'fc=float'"
            " or 'layer4.*=16,a4'"
        )
    override = LayerOverride(pattern)
    for spec in specs.split(","):
        if spec in ("ternary", "int8", "float"):
            override = replace(override, weights=spec)
        elif spec in ("a8", "a4"):
            override = replace(override, act_bits=parse_act_bits(spec[1:]))
        else:
            override = replace(override, group_size=parse_group_size(spec))
    return override
