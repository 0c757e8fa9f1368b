"""Portable layers: exactly two implementations each, mint / FlashAttentionScore on Ascend and plain MindSpore ops
elsewhere (`pixart.cpu` adds CPU kernels to a built model without changing these)."""
from pixart.nn.attention import Attention
from pixart.nn.layers import (GELU, Conv2d, Embedding, GatedResidual, GroupNorm, LayerNorm, Linear, Method, chunk,
                              expand_as)

__all__ = ["Attention", "Conv2d", "Embedding", "GELU", "GatedResidual", "GroupNorm", "LayerNorm", "Linear", "Method",
           "chunk", "expand_as"]
