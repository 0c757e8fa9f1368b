"""PixArt-Σ's key/value token compression, as options and configs describe it (no MindSpore: the command-line
checks use it before any model loads; `pixart.models.pixart` builds the attention from it)."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class KVCompression:
    """PixArt-Σ's key/value token compression: in `layers`, self-attention's keys and values are downsampled by
    `scale_factor` on the token grid (`sampling`: "conv", "ave" or "uniform"; None: no compression)."""
    sampling: str | None = None
    scale_factor: int = 1
    layers: tuple[int, ...] = ()

    @classmethod
    def of(cls, value) -> "KVCompression":
        """From None, a KVCompression, or a dict: the configs' {"sampling", "scale_factor", "kv_compress_layer"} or
        this class's own fields (`dataclasses.asdict`, as a `.ckpt` records it)."""
        if value is None or isinstance(value, cls):
            return value or cls()
        if not isinstance(value, dict):
            raise TypeError(f"KV compression must be a KVCompression or a dict, got {type(value).__name__}")
        unknown = set(value) - {"sampling", "scale_factor", "kv_compress_layer", "layers"}
        if unknown:
            raise ValueError(f"unknown KV compression keys {sorted(unknown)}; expected sampling, scale_factor, "
                             "kv_compress_layer")
        layers = value.get("kv_compress_layer", value.get("layers"))
        return cls(value.get("sampling"), int(value.get("scale_factor", 1)), tuple(int(i) for i in layers or ()))

    SAMPLINGS = ("conv", "ave", "uniform")
    DEFAULT_SCALE_FACTOR = 2  # PixArt-Σ's KV-compressed models: keys and values downsampled 2x each way

    @classmethod
    def from_options(cls, sampling: str = "conv", scale_factor: int | None = None, layers=None,
                     depth: int | None = None, name=lambda option: option) -> "KVCompression":
        """The compression the options kv_compress_sampling / kv_compress_scale_factor / kv_compress_layer ask for,
        checked (ValueError naming the value and what is allowed; `name(option)` is how a message names an option,
        e.g. as a command-line flag). An unset factor is 2; unset layers are the second half of `depth` blocks (Σ's
        14..27 of 28), left empty when the depth is not known yet."""
        if sampling not in cls.SAMPLINGS:
            raise ValueError(f"{name('kv_compress_sampling')} {sampling!r} is not one of {', '.join(cls.SAMPLINGS)}")
        factor = cls.DEFAULT_SCALE_FACTOR if scale_factor is None else scale_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"{name('kv_compress_scale_factor')} {factor!r} is not allowed: an integer >= 1 (1: no "
                             f"compression; {cls.DEFAULT_SCALE_FACTOR}: PixArt-Σ's KV models)")
        layers = list(layers or ())
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < (depth or math.inf)]
        if bad:
            raise ValueError(f"{name('kv_compress_layer')} {' '.join(map(str, bad))}: the model has {depth} blocks (layers 0 .. "
                             f"{depth - 1})" if depth else
                             f"{name('kv_compress_layer')} {' '.join(map(str, bad))}: layers are whole numbers from 0")
        if depth is not None:
            layers = layers or list(range(depth // 2, depth))
        return cls(sampling, factor, tuple(layers))

    def config(self) -> dict:
        """As the configs write it: {"sampling", "scale_factor", "kv_compress_layer"}."""
        return {"sampling": self.sampling, "scale_factor": self.scale_factor, "kv_compress_layer": list(self.layers)}

    def ratio(self, layer: int) -> int:
        """The downsampling factor of block `layer`'s keys and values (1: none)."""
        return self.scale_factor if self.sampling and layer in self.layers else 1
