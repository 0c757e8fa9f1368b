"""Scaled dot-product attention: FlashAttentionScore on Ascend, batched matmuls and an fp32 softmax elsewhere."""
from __future__ import annotations

import mindspore as ms
from mindspore import mint, nn, ops

from pixart.backend import on_ascend, use_flash_attention
from pixart.nn.layers import expand_as


class Attention(nn.Cell):
    """Scaled dot-product attention over (B, N, heads * head_dim) tensors, "BSH" layout.

    `mask` is an optional (B, Nk) keep-mask (1 = attend, 0 = padding). Ascend: FlashAttentionScore, whose softmax
    runs in fp32 internally. Elsewhere: heads first, batched matmul, fp32 softmax, batched matmul, heads back; from
    `per_head_min_tokens` query tokens on (512 px and up), `head_group` heads at a time, so that only their
    (B, g, Nq, Nk) scores are live rather than every head's (2 x 16 x 4096^2 fp32 = 2 GiB at 1024 px).
    """

    per_head_min_tokens = 1024
    head_group = 4

    def __init__(self, num_heads: int, head_dim: int, flash: bool | None = None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = head_dim ** -0.5
        self.flash = use_flash_attention() if flash is None else flash
        if self.flash and not on_ascend():
            raise ValueError("flash attention needs an Ascend device")
        self.bmm_qk = ops.BatchMatMul(transpose_b=True)
        self.bmm_pv = ops.BatchMatMul()

    def construct(self, q, k, v, mask=None):
        if self.flash:
            drop = None
            if mask is not None:  # FlashAttentionScore masks where the mask is 1
                drop = (1 - mask.astype(ms.uint8)).reshape(mask.shape[0], 1, 1, -1)
                drop = drop.broadcast_to((mask.shape[0], 1, q.shape[1], mask.shape[1]))
            return ops.flash_attention_score(q, k, v, self.num_heads, attn_mask=drop, scalar_value=self.scale,
                                             input_layout="BSH")
        q, k, v = self.to_heads(q, True), self.to_heads(k, False), self.to_heads(v, False)
        keep = None if mask is None else mask.astype(ms.float32)  # (B, Nk)
        return self.from_heads(self.attend_heads(q, k, v, keep))

    def attend_heads(self, q, k, v, keep):
        """`attend` over every head, `head_group` heads at a time from `per_head_min_tokens` query tokens on."""
        h, g = self.num_heads, self.head_group
        if q.shape[2] < self.per_head_min_tokens or h % g:
            return self.attend(q, k, v, keep)
        return mint.cat([self.attend(q[:, i:i + g], k[:, i:i + g], v[:, i:i + g], keep) for i in range(0, h, g)], 1)

    def to_heads(self, x, is_query: bool):
        """(B, N, H*d) -> (B, H, N, d); queries times 1/sqrt(d)."""
        b, n, _ = x.shape
        x = x.reshape(b, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        return x * self.scale if is_query else x

    def from_heads(self, x):
        """(B, H, N, d) -> (B, N, H*d)."""
        b, h, n, d = x.shape
        return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)

    def attend(self, q, k, v, keep):
        """Heads-first q (B, h, Nq, d) (already scaled), k and v (B, h, Nk, d), keep (B, Nk) or None
        -> (B, h, Nq, d)."""
        scores = self.bmm_qk(q, k).astype(ms.float32)  # (B, h, Nq, Nk)
        probs = self.softmax(scores, keep)
        return self.bmm_pv(probs.astype(v.dtype), v)

    def softmax(self, scores, keep):
        """Softmax over the keys of (B, h, Nq, Nk) fp32 scores, padded keys (keep 0) dropped."""
        if keep is not None:
            b, nk = keep.shape
            scores = scores + expand_as(((1.0 - keep) * -1e9).reshape(b, 1, 1, nk), scores)
        return mint.softmax(scores, -1)
