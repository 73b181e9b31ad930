"""Graph passes over Relax."""

from .legalize_quantized_layers import LegalizeQuantizedLayers, layer_encoding

__all__ = ["LegalizeQuantizedLayers", "layer_encoding"]
