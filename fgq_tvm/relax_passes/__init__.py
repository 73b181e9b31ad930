"""Graph passes over Relax."""

from .legalize_quantized_layers import LegalizeQuantizedLayers, layer_encoding
from .promote_averages import PromoteAveragesToFloat64

__all__ = ["LegalizeQuantizedLayers", "PromoteAveragesToFloat64", "layer_encoding"]
