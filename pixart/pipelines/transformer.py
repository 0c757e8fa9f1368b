"""`PixArtTransformer2DModel`: our PixArt under diffusers' name, loading from and saving to diffusers folders (the
names converted in memory by `pixart.models.convert`, the code tools/convert.py runs)."""
from __future__ import annotations

import numpy as np
import mindspore as ms

from pixart.models.convert import save_diffusers_transformer
from pixart.models.pixart import PixArt
from pixart.pipelines.loading import dtype_name, load_transformer, resolve_pretrained


def _quiet(*_):
    pass


def parameters_numpy(net) -> dict[str, np.ndarray]:
    """{name: array} of `net`'s parameters in their dtype (bf16, which NumPy lacks, as float32)."""
    return {p.name: (p.astype(ms.float32) if p.dtype == ms.bfloat16 else p).asnumpy() for p in net.get_parameters()}


class PixArtTransformer2DModel(PixArt):
    """PixArt-α / Σ with diffusers' `from_pretrained` / `save_pretrained`; computes exactly as `PixArt`."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, mindspore_dtype=None,
                        model: str | None = None, log=_quiet) -> "PixArtTransformer2DModel":
        """Any PixArt transformer checkpoint (a diffusers folder or hub id in the local cache, our .ckpt, an original
        .pth); `model` names the preset where the files leave the architecture open (see `load_transformer`)."""
        path = resolve_pretrained(pretrained_model_name_or_path, subfolder)
        return load_transformer(path, model, dtype_name(mindspore_dtype), log=log, cls=cls)

    def save_pretrained(self, save_directory) -> None:
        """Write a diffusers transformer folder (config.json + diffusion_pytorch_model.safetensors) that diffusers'
        `PixArtTransformer2DModel.from_pretrained` loads as it is."""
        save_diffusers_transformer(parameters_numpy(self), self.config, save_directory)
