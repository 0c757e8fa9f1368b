"""The diffusers-shaped API: PixArtAlphaPipeline / PixArtSigmaPipeline (names over the one PixArtPipeline),
PixArtTransformer2DModel, from_pretrained / save_pretrained of diffusers folders."""
from .text_to_image import PipelineOutput, PixArtAlphaPipeline, PixArtPipeline, PixArtSigmaPipeline
from .transformer import PixArtTransformer2DModel

__all__ = ["PipelineOutput", "PixArtAlphaPipeline", "PixArtPipeline", "PixArtSigmaPipeline",
           "PixArtTransformer2DModel"]
