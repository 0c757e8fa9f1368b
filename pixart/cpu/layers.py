"""The portable layers of `pixart.nn` computing with the fused fp32 CPU kernels (`pixart.cpu.kernels`): the same
functions, fewer launches and temporaries on MindSpore's CPU backend.

Each class subclasses its portable layer and only adds kernels: `pixart.cpu.accelerate` swaps a built layer's class
for the one here and calls `attach()`, its Parameters untouched. Every kernel path is fp32; other dtypes, and
inference-only kernels in training mode, keep the portable ops (which have gradients). The portable method is called
by its class, not by `super()`: MindSpore's graph mode resolves `super()` from the instance's class, so in a class
that `accelerate` mixes (LoRALinear over CPULinear) `super()` would lead back to the method that calls it.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor

from pixart import nn
from pixart.cpu import kernels
from pixart.models.pixart import AttentionKVCompress, Mlp, MultiHeadCrossAttention, PatchEmbed
from pixart.models.t5 import T5Attention, T5DenseActDense, T5LayerNorm


class CPULinear(nn.Linear):
    """Linear whose product is the AVX-512 GEMM (`kernels.linear_product`: strict fp32, with a gradient) or, with
    PIXART_CPU_GEMM=bf16x3 on CPUs with Intel AMX, the bf16x3 product (inference only, never for a `strict` layer),
    and whose bias + GELU run as one kernel. Products of more than `kernel_max_rows` rows keep MindSpore's MatMul,
    which is faster there (measurements: docs/benchmarks.md, 'Design measurements').

    A weight stored in bf16 or fp16 (`backend.cast_parameters` on CPU) with fp32 activations takes the half-weight
    product (`kernels.half_linear_product`, inference, any number of rows: MindSpore has no mixed product to fall
    back to); without it, the portable product widens the weight per call."""

    kernel_max_rows = 1024

    def attach(self):
        adds_bias = self.bias is not None and self.activation is None  # else the epilogue adds it (with GELU)
        self.kernel, self.kernel_trains = kernels.linear_product(self.strict, adds_bias)
        self.kernel_adds_bias = self.kernel is not None and adds_bias
        self.fused_gelu = kernels.bias_gelu_tanh() if self.activation is not None and self.bias is not None else None
        self.half_kernel = kernels.half_linear_product(adds_bias) if kernels.half_weights("fp16") else None
        self.bf16_kernel = kernels.half_weights("bf16")
        self.half_adds_bias = adds_bias

    def on_kernel(self, dtype, rows) -> bool:
        """Whether this call takes the GEMM kernel: one was chosen, fp32, at most `kernel_max_rows` rows (a static
        shape in graph mode), and inference unless it has a gradient."""
        return (self.kernel is not None and (self.kernel_trains or not self.training) and dtype == ms.float32
                and rows <= self.kernel_max_rows and self.weight.dtype == ms.float32)

    def on_half_kernel(self, dtype) -> bool:
        """Whether this call takes the half-weight product: fp32 activations, the weight in fp16 or (where the
        kernel has it) bf16, inference."""
        if self.half_kernel is None or self.training or dtype != ms.float32:
            return False
        return self.weight.dtype == ms.float16 or (self.bf16_kernel and self.weight.dtype == ms.bfloat16)

    def product(self, x2d):
        """x W^T (M, out), plus the bias where the kernel adds it (`epilogue` then does not)."""
        if self.on_half_kernel(x2d.dtype):
            if self.half_adds_bias:
                return self.half_kernel(x2d, self.weight, self.bias)
            return self.half_kernel(x2d, self.weight)
        if self.on_kernel(x2d.dtype, x2d.shape[0]):
            if self.kernel_adds_bias:
                return self.kernel(x2d, self.weight, self.bias)
            return self.kernel(x2d, self.weight)
        return nn.Linear.product(self, x2d)

    def epilogue(self, y, in_shape):
        if self.fused_gelu is not None and y.dtype == ms.float32:  # with its gradient: training takes it too
            return self.fused_gelu(y, self.bias).reshape(in_shape[:-1] + (self.out_features,))
        if (self.half_adds_bias and self.on_half_kernel(y.dtype)) or (
                self.kernel_adds_bias and self.on_kernel(y.dtype, y.shape[0])):  # the product added the bias
            return y.reshape(in_shape[:-1] + (self.out_features,))
        return nn.Linear.epilogue(self, y, in_shape)


class CPULayerNorm(nn.LayerNorm):
    """adaLN's `modulated` as one kernel (with its gradient) for the LayerNorms without affine parameters."""

    def attach(self):
        self.fused = kernels.layer_norm_modulate() if not self.affine else None
        self.eps_tensor = Tensor([self.eps], ms.float32)

    def modulated(self, x, shift, scale):
        if self.fused is not None and x.dtype == ms.float32:
            return self.fused(x, shift, scale, self.eps_tensor)
        return nn.LayerNorm.modulated(self, x, shift, scale)


class CPUGatedResidual(nn.GatedResidual):
    """x + gate * y as one kernel, with its gradient."""

    def attach(self):
        self.fused = kernels.gated_residual()

    def construct(self, x, gate, y):
        if x.dtype == ms.float32:
            return self.fused(x, gate, y)
        return nn.GatedResidual.construct(self, x, gate, y)


class CPUGroupNorm(nn.GroupNorm):
    """GroupNorm and SiLU(GroupNorm) as one kernel each (inference; mint's CPU GroupNorm is slow enough to take a
    large share of a VAE decode)."""

    def attach(self):
        self.fused = (kernels.op("GroupNorm"), kernels.op("GroupNormSiLU")) if self.affine else None
        self.settings = Tensor([self.num_groups, self.eps], ms.float32)

    def construct(self, x):
        if self.fused is not None and not self.training and x.dtype == ms.float32:
            return self.fused[0](x, self.weight, self.bias, self.settings)
        return nn.GroupNorm.construct(self, x)

    def silu(self, x):
        if self.fused is not None and not self.training and x.dtype == ms.float32:
            return self.fused[1](x, self.weight, self.bias, self.settings)
        return nn.GroupNorm.silu(self, x)


class CPUAttention(nn.Attention):
    """fp32 attention with the layout changes and scaling as kernels and, on CPUs with AVX-512, the two products and
    the softmax as one kernel (`kernels.attention`: a block of queries at a time, so the (B, H, Nq, Nk) scores never
    exist; its gradient recomputes the probabilities); other CPUs keep the batched matmuls with a fused (masked)
    softmax. All with gradients."""

    def attach(self):
        self.heads_kernel, self.from_heads_kernel = kernels.to_heads(self.num_heads), kernels.from_heads()
        self.masked_softmax, self.plain_softmax = kernels.softmax(masked=True), kernels.softmax(masked=False)
        self.scales = (Tensor([self.scale], ms.float32), Tensor([1.0], ms.float32))
        self.attend_kernel, self.attend_masked_kernel = kernels.attention(masked=False), kernels.attention(masked=True)

    def construct(self, q, k, v, mask=None):
        if self.flash or q.dtype != ms.float32:
            return nn.Attention.construct(self, q, k, v, mask)
        q = self.heads_kernel(q, self.scales[0])  # (B, H, Nq, d), times 1/sqrt(d)
        k, v = self.heads_kernel(k, self.scales[1]), self.heads_kernel(v, self.scales[1])
        keep = None if mask is None else mask.astype(ms.float32)  # (B, Nk)
        if self.attend_kernel is not None:
            out = self.attend_kernel(q, k, v) if keep is None else self.attend_masked_kernel(q, k, v, keep)
        else:
            out = self.attend_heads(q, k, v, keep)
        return self.from_heads_kernel(out)

    def attend(self, q, k, v, keep):
        if q.dtype != ms.float32:
            return nn.Attention.attend(self, q, k, v, keep)
        scores = self.bmm_qk(q, k)  # (B, h, Nq, Nk)
        probs = self.plain_softmax(scores) if keep is None else self.masked_softmax(scores, keep)
        return self.bmm_pv(probs, v)


def _token_attention(attention: nn.Attention):
    """(`kernels.token_attention()`'s primitives, or None where they do not apply: no AVX-512 library, flash
    attention; [scale, heads] for `attention`)."""
    prims = None if attention.flash else kernels.token_attention()
    return prims, Tensor([attention.scale, attention.num_heads], ms.float32)


class CPUSelfAttention(AttentionKVCompress):
    """Self-attention whose heads read queries, keys and values in place from the fused qkv projection (inference,
    fp32 activations; `kernels.token_attention`): without the split into q, k, v and the head-layout copies, each a
    tokens-sized temporary that MindSpore CPU's graph keeps to its end (7 of the 11 such in the layer; measurements:
    docs/benchmarks.md, 'Where a bf16 step's memory goes'). KV compression and qk-norm keep the portable path."""

    def attach(self):
        self.token_attention, self.scale_heads = _token_attention(self.attention)

    def construct(self, x, hw):
        if (self.token_attention is None or self.training or x.dtype != ms.float32 or self.qk_norm
                or self.sampling is not None):
            return AttentionKVCompress.construct(self, x, hw)
        return self.proj(self.token_attention[0](self.qkv(x), self.scale_heads))


class CPUCrossAttention(MultiHeadCrossAttention):
    """Cross-attention on the token-major projections (inference, fp32 activations; `kernels.token_attention`): the
    heads read queries and keys/values in place, without the split and head-layout copies. In inference it also
    projects the caption's keys/values in each step from the caption tokens, as diffusers does, instead of keeping
    them for every block through all of sampling's steps: that cache (depth x (N, L, 2D) fp32, 0.06 GiB at 120
    tokens, 0.15 at 300) outweighs a step's working memory at 256 px, and the projection costs ~6% of an fp32 step
    there (docs/benchmarks.md, 'Where a bf16 step's memory goes'). `caption_kv` then returns the caption tokens,
    which `construct` tells apart by their width."""

    def attach(self):
        self.recompute_kv = True
        self.token_attention, self.scale_heads = _token_attention(self.attention)

    def defers_kv(self) -> bool:
        """Whether `caption_kv` returns the caption tokens themselves (then one tensor serves every block)."""
        return self.recompute_kv and not self.training

    def caption_kv(self, cond):
        if self.defers_kv():
            return cond  # (N, L, C): projected in `construct`
        return MultiHeadCrossAttention.caption_kv(self, cond)

    def construct(self, x, kv, mask=None):
        if kv.shape[-1] == self.q_linear.out_features:  # the caption tokens (see `caption_kv`)
            kv = self.kv_linear(kv)
        if self.token_attention is None or self.training or x.dtype != ms.float32 or kv.dtype != ms.float32:
            return MultiHeadCrossAttention.construct(self, x, kv, mask)
        q = self.q_linear(x)
        if mask is None:
            return self.proj(self.token_attention[1](q, kv, self.scale_heads))
        return self.proj(self.token_attention[2](q, kv, mask.astype(ms.float32), self.scale_heads))


class CPUPatchEmbed(PatchEmbed):
    """Patch tokens plus position embedding as one kernel (inference, fp32): MindSpore CPU's convolution, the
    transpose to tokens and the broadcast add each keep an output of the tokens' size for as long as the graph holds
    them (measurements: docs/benchmarks.md, 'Where a bf16 step's memory goes'). A LoRA on the convolution keeps the
    portable path."""

    def attach(self):
        self.fused = kernels.patch_embed()

    def with_position(self, x, pos):
        if (self.training or x.dtype != ms.float32 or self.proj.weight.dtype != ms.float32 or self.proj.bias is None
                or hasattr(self.proj, "lora_A")):
            return PatchEmbed.with_position(self, x, pos)
        return self.fused(x, self.proj.weight, self.proj.bias, pos.reshape(-1, pos.shape[-1]).astype(ms.float32))


class CPUMlp(Mlp):
    """The block's MLP with bf16 weights as one kernel (inference, fp32 activations; `kernels.mlp_half`): the hidden
    layer, 4x the tokens' width, exists a block of rows at a time instead of as fc1's and GELU's whole outputs, the
    largest temporaries of a block's graph (docs/benchmarks.md, 'Where a bf16 step's memory goes'). A LoRA on
    either layer keeps the two Linear layers."""

    def attach(self):
        fc1, fc2 = self.fc1, self.fc2
        fits = (fc1.weight.dtype == ms.bfloat16 and fc2.weight.dtype == ms.bfloat16 and fc1.bias is not None
                and fc2.bias is not None and getattr(fc1.activation, "approximate", None) == "tanh"
                and fc2.activation is None)
        self.fused = kernels.mlp_half() if fits and kernels.half_weights("bf16") else None

    def construct(self, x):
        if (self.fused is None or self.training or x.dtype != ms.float32 or hasattr(self.fc1, "lora_A")
                or hasattr(self.fc2, "lora_A")):
            return Mlp.construct(self, x)
        y = self.fused(x.reshape(-1, x.shape[-1]), self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        return y.reshape(x.shape[:-1] + (y.shape[-1],))


class CPUT5LayerNorm(T5LayerNorm):
    """T5's RMS norm as one kernel (inference, fp32): the portable form is five MindSpore ops, each a pass over the
    row block with a launch of its own, and MindSpore CPU's reductions and rsqrt are slow on T5-XXL's rows."""

    def attach(self):
        self.fused = kernels.rms_norm()
        self.eps_tensor = Tensor([self.eps], ms.float32)

    def construct(self, x):
        if not self.training and x.dtype == ms.float32 and self.weight.dtype == ms.float32:
            return self.fused(x, self.weight, self.eps_tensor)
        return T5LayerNorm.construct(self, x)


def _fp32_outputs(*linears) -> bool:
    """Whether these Linear layers map fp32 inputs to fp32 outputs: weights in fp32, or stored in bf16 / fp16 for
    fp32 compute (`backend.cast_parameters` on CPU; the half-weight product or the portable widening). Checked once,
    in `attach` (the weights' dtypes are final by then: models are cast as they load, before `accelerate`), so that
    a kernel taking the projections' outputs never finds them in another dtype and recomputes them."""
    return all(lin.weight.dtype in (ms.float32, ms.bfloat16, ms.float16) for lin in linears)


class CPUT5Attention(T5Attention):
    """T5's attention with the position bias as one kernel (`kernels.t5_attention`, inference, fp32 activations):
    on the Linear layers' token-major outputs, so without the head transposes, the broadcast bias add and the
    (B, H, N, N) scores, each a slow MindSpore CPU op at T5-XXL's 64 heads."""

    def attach(self):
        self.fused = kernels.t5_attention() if _fp32_outputs(self.q, self.k, self.v) else None

    def construct(self, x, bias):
        if self.fused is None or self.training or x.dtype != ms.float32:
            return T5Attention.construct(self, x, bias)
        return self.o(self.fused(self.q(x), self.k(x), self.v(x), bias))  # q, k, v: (B, N, H*d) fp32


class CPUT5DenseActDense(T5DenseActDense):
    """T5 v1.1's gated feed-forward with gelu_tanh(wi_0 x) * wi_1 x as one kernel (inference, fp32 activations)."""

    def attach(self):
        tanh_gated = self.gated and getattr(self.act, "approximate", None) == "tanh"
        self.fused = kernels.gelu_tanh_mul() if tanh_gated and _fp32_outputs(self.wi_0, self.wi_1) else None

    def construct(self, x):
        if self.fused is None or self.training or x.dtype != ms.float32:
            return T5DenseActDense.construct(self, x)
        return self.wo(self.fused(self.wi_0(x), self.wi_1(x)))


class CPUEmbedding(nn.Embedding):
    """Embedding whose table, stored in bf16 or fp16 (`backend.cast_parameters` on CPU), is looked up by a kernel
    giving fp32 rows (MindSpore's CPU Gather has no bf16; the portable layer widens the whole table per call)."""

    def attach(self):
        self.half_gather = kernels.gather_rows_half() if kernels.half_weights("fp16") else None

    def construct(self, ids):
        if self.half_gather is not None and self.weight.dtype in (ms.bfloat16, ms.float16):
            return self.half_gather(self.weight, ids)
        return nn.Embedding.construct(self, ids)


# portable class -> its CPU-kernel subclass
CPU_CLASSES = {nn.Linear: CPULinear, nn.Embedding: CPUEmbedding, T5LayerNorm: CPUT5LayerNorm, nn.LayerNorm: CPULayerNorm, nn.GatedResidual: CPUGatedResidual,
               T5Attention: CPUT5Attention, T5DenseActDense: CPUT5DenseActDense,
               nn.GroupNorm: CPUGroupNorm, nn.Attention: CPUAttention,
               MultiHeadCrossAttention: CPUCrossAttention, AttentionKVCompress: CPUSelfAttention,
               PatchEmbed: CPUPatchEmbed, Mlp: CPUMlp}
