"""Graph passes over Relax."""

from .legalize_quantized_layers import LegalizeQuantizedLayers, layer_encoding
from .lift_constant_computations import PREPARE, LiftConstantComputations
from .promote_averages import PromoteAveragesToFloat64

__all__ = [
    "PREPARE",
    "LegalizeQuantizedLayers",
    "LiftConstantComputations",
    "PromoteAveragesToFloat64",
    "layer_encoding",
]
