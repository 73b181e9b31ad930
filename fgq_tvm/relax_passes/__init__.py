"""Graph passes over Relax."""

from .apply_tuned_schedules import ApplyTunedSchedules
from .fuse_layer_epilogues import FuseLayerEpilogues
from .legalize_quantized_layers import LegalizeQuantizedLayers, layer_encoding
from .lift_constant_computations import PREPARE, LiftConstantComputations
from .promote_averages import PromoteAveragesToFloat64

__all__ = [
    "PREPARE",
    "ApplyTunedSchedules",
    "FuseLayerEpilogues",
    "LegalizeQuantizedLayers",
    "LiftConstantComputations",
    "PromoteAveragesToFloat64",
    "layer_encoding",
]
