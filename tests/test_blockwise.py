"""Block-by-block backpropagation (pixart/cpu/blockwise.py, train.py's --recompute on CPU graph mode): the same
loss and gradients as one graph of the whole step, the same weights after training steps, a bounded number of
compiled graphs (one forward and one vjp per block structure, not per block), and dropout refused."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from pixart import cpu
from pixart.cpu.blockwise import BlockwiseGrad, BlockwiseTrainStep
from pixart.diffusion.loss import DiffusionLoss
from pixart.models.lora import inject_lora
from pixart.models.pixart import PixArt, preset_config
from pixart.training.ema import EMA
from pixart.training.optimizers import build_optimizer
from pixart.training.step import TrainStep, _ScaledLoss
from tests.utils import rel_err

pytestmark = pytest.mark.slow

KV = {"sampling": "conv", "scale_factor": 2, "kv_compress_layer": [1, 2]}  # blocks 1, 2 differ from block 0


def sigma_kv(seed=0, depth=3):
    """A tiny PixArt-Σ-KV multi-scale model: micro-conditions, KV compression on the last two of its blocks."""
    ms.set_seed(seed)
    np.random.seed(seed)
    return cpu.accelerate(PixArt(preset_config("PixArt-Sigma-XL-2-1024-MS-KV", depth=depth, hidden_size=32,
                                               num_heads=2, caption_channels=8, model_max_length=4,
                                               kv_compress_config=KV)))


def batch(rng, h=8, w=12, n=2):
    """Timesteps 1 and 500, not 0: at t=0 the loss is IDDPM's discretized decoder likelihood, whose fp32 bin masses
    on random latents are 0 or a few ulps (log(cdf+ - cdf-)), so its gradient changes by whole percents with the
    last bit of the model output; comparisons of two correct orders of rounding would measure that, not this file."""
    return [Tensor(rng.standard_normal((n, 4, h, w)).astype(np.float32)), Tensor(np.array([1, 500][:n], np.int32)),
            Tensor(rng.standard_normal((n, 4, h, w)).astype(np.float32)),
            Tensor(rng.standard_normal((n, 1, 4, 8)).astype(np.float32)),
            Tensor(np.array([[1, 1, 1, 0], [1, 1, 0, 0]][:n], np.int32)),
            Tensor(np.tile(np.array([[h * 8, w * 8]], np.float32), (n, 1))),
            Tensor(np.full((n, 1), h / w, np.float32)), Tensor(np.array([0, 1][:n], np.int32))]


def check_gradients(model, weights, data):
    model.set_train(True)
    loss = DiffusionLoss(model)
    scale = Tensor(4.0, ms.float32)
    (ref_loss, ref_terms), ref = ms.value_and_grad(_ScaledLoss(loss), None, ms.ParameterTuple(weights),
                                                   has_aux=True)(*data, scale)
    blockwise = BlockwiseGrad(loss, weights)
    ours_loss, ours_terms = blockwise(*data, scale)
    ours = blockwise.buffers
    assert rel_err(ours_loss.asnumpy(), ref_loss.asnumpy()) < 1e-6
    assert rel_err(ours_terms.asnumpy(), ref_terms.asnumpy()) < 1e-6
    assert len(ours) == len(weights)
    for p, a, b in zip(weights, ours, ref):
        assert rel_err(a.asnumpy(), b.asnumpy()) < 1e-5, p.name
    assert sum(np.abs(g.asnumpy()).sum() > 0 for g in ours) == len(weights)  # every weight got a gradient
    return blockwise


def test_gradients_equal_the_whole_graph(rng, graph_mode):
    model = sigma_kv()
    blockwise = check_gradients(model, model.trainable_params(), batch(rng))
    assert len({id(t) for t in blockwise.templates}) == 2  # plain blocks and KV-compressed blocks
    assert blockwise.compiled_graphs() == 3 + 2 * 2  # head, head vjp, tail vjp + (forward, vjp) per structure


def test_lora_gradients_equal_the_whole_graph(rng, graph_mode):
    model = sigma_kv()
    params = inject_lora(model, rank=2)
    cpu.accelerate(model)  # the LoRA layers too
    for p in params:  # B starts at zero, which leaves A without gradient
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.1))
    check_gradients(model, params, batch(rng))
    with pytest.raises(ValueError, match="dropout"):
        model = sigma_kv()
        BlockwiseGrad(DiffusionLoss(model), inject_lora(model, rank=2, dropout=0.1))


def test_training_steps_equal_the_whole_graph_and_compile_per_shape(rng, graph_mode):
    """Two AdamW steps of two micro-batches each (clipping, EMA), one bucket shape per step: the same weights, EMA
    and gradient norms as the one-graph step; the graphs compile per shape and kind of call, not per block."""
    data = [batch(rng), batch(rng), batch(rng, 10, 6), batch(rng, 10, 6)]
    results = []
    for blockwise in (False, True):
        model = sigma_kv(seed=1)
        # eps 1e-4, not 1e-10: AdamW turns gradients that are zero up to rounding (the key bias's) into +-lr steps
        optimizer = build_optimizer("adamw", model.trainable_params(), 1e-3, eps=(1e-4,))
        step = cpu.accelerate_step(TrainStep(DiffusionLoss(model), optimizer, EMA(optimizer.parameters, 0.9),
                                             clip_grad=0.5, accumulate=2))
        step.set_train(True)
        run = BlockwiseTrainStep(step) if blockwise else step
        norms = [float(run(*d, Tensor(1e-3, ms.float32), k % 2 == 1)[2].asnumpy()) for k, d in enumerate(data)]
        if blockwise:  # per shape: head, and (written, added) x (head vjp, tail vjp, 2 structures x (forward, vjp))
            assert run.compiled_graphs() == 2 * (1 + 2 + 2 + 2 * (1 + 2)) + 2  # + the update (applying or not)
        results.append(({p.name: p.asnumpy() for p in model.trainable_params()}, step.ema.state_dict(), norms))
    (w1, e1, n1), (w2, e2, n2) = results
    assert float(optimizer.step.asnumpy()) == 2
    assert np.allclose(n1, n2, rtol=1e-5)
    for name in w1:
        assert rel_err(w2[name], w1[name]) < 1e-5, name
        assert rel_err(e2[name], e1[name]) < 1e-5, name
