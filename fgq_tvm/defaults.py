"""The quantization a model gets: the settings given, and for the others the defaults that fit
its calibration data (:func:`~fgq_tvm.config.data_defaults`), with the calibration images."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import QuantConfig, data_defaults
from .data import has_real_calibration, load_calibration
from .models import ModelSpec, layer_ops, macs_per_image


@dataclass(frozen=True)
class QuantInputs:
    """What quantizing a model needs.

    Attributes
    ----------
    quant
        The quantization.
    calibration
        The normalised calibration images.
    warnings
        One line each: the calibration images are random, or the defaults are not the best
        method (and why).
    """

    quant: QuantConfig
    calibration: torch.Tensor
    warnings: tuple[str, ...]


def quantization_inputs(
    model: nn.Module,
    spec: ModelSpec,
    given: Mapping[str, object],
    calib: str | Path | None = None,
    calib_split: str = "calib",
    calib_images: int | None = None,
) -> QuantInputs:
    """The quantization of ``model`` and its calibration images.

    Parameters
    ----------
    model, spec
        The float model and its spec.
    given
        The :class:`~fgq_tvm.config.QuantConfig` fields set by the user; the others default
        by the calibration data.
    calib, calib_split
        The calibration images (:func:`~fgq_tvm.data.load_calibration`; ``None``: the default).
    calib_images
        The most calibration images to use; ``None``: as many as the defaults say
        (:meth:`~fgq_tvm.config.DataDefaults.calib_images`).

    Raises
    ------
    UsageError, FGQError
        A layer override matches no layer; the calibration images cannot be read.
    """
    defaults = data_defaults(has_real_calibration(calib, spec), macs_per_image(model, spec))
    quant = QuantConfig(**{**defaults.quant_fields(), **given})
    quant.check_overrides(list(layer_ops(model)))  # before loading the calibration images
    images = calib_images or defaults.calib_images(quant.reconstruction)
    calibration, warning = load_calibration(calib, spec, calib_split, images)
    unset = [field for field in defaults.quant_fields() if field not in given]
    notes = (warning, defaults.note if unset else None)
    return QuantInputs(quant, calibration, tuple(line for line in notes if line))
