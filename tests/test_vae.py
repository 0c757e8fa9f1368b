"""AutoencoderKL against diffusers' PyTorch AutoencoderKL: encode, decode, tiled decode, old attention names,
graph mode, fp16, and the errors a wrong folder gives."""
import json
import shutil

import numpy as np
import pytest
import torch
from mindspore import Tensor

from pixart import backend
from pixart.io import CheckpointError, read_state_dict, write_safetensors
from pixart.models.vae import AutoencoderKL, load_vae
from tests.utils import rel_err

diffusers = pytest.importorskip("diffusers")

SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, latent_channels=4, sample_size=32)
SD = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
          sample_size=64)


def reference_vae(folder, seed=0, max_shard_size=None, **cfg):
    """A random diffusers AutoencoderKL (norm weights and biases perturbed too), saved to `folder`."""
    torch.manual_seed(seed)
    n = len(cfg["block_out_channels"])
    vae = diffusers.AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * n,
                                  up_block_types=["UpDecoderBlock2D"] * n, **cfg).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    vae.save_pretrained(folder, **kw)
    return vae


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae_small")
    return folder, reference_vae(folder, **SMALL)


def torch_encode_decode(vae, x, z):
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(x)).latent_dist
        return dist.mean.numpy(), dist.logvar.numpy(), vae.decode(torch.from_numpy(z)).sample.numpy()


@pytest.mark.parity
def test_small_matches_diffusers(small, rng):
    folder, ref = small
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    z = rng.standard_normal((2, 4, 12, 10)).astype(np.float32)
    mean_ref, logvar_ref, img_ref = torch_encode_decode(ref, x, z)
    vae = load_vae(folder)
    mean, logvar = vae.encode(Tensor(x))
    img = vae.decode(Tensor(z))
    assert mean.shape == (2, 4, 16, 16) and img.shape == (2, 3, 24, 20)
    errs = rel_err(mean.asnumpy(), mean_ref), rel_err(logvar.asnumpy(), logvar_ref), rel_err(img.asnumpy(), img_ref)
    print(f"\nsmall VAE rel err: mean {errs[0]:.2e} logvar {errs[1]:.2e} decode {errs[2]:.2e}")
    assert max(errs) <= 1e-5
    noise = rng.standard_normal(mean.shape).astype(np.float32)
    s = AutoencoderKL.sample(mean, logvar, Tensor(noise)).asnumpy()
    np.testing.assert_allclose(s, mean_ref + np.exp(0.5 * logvar_ref) * noise, rtol=1e-4, atol=1e-4)


@pytest.mark.parity
def test_sd_width_matches_diffusers(tmp_path, rng):
    """The real SD/SDXL widths, where accumulation error shows; weights saved as shards."""
    ref = reference_vae(tmp_path, seed=1, max_shard_size="100MB", **SD)
    assert list(tmp_path.glob("*.index.json"))
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    z = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    mean_ref, logvar_ref, img_ref = torch_encode_decode(ref, x, z)
    vae = load_vae(tmp_path)
    mean, logvar = vae.encode(Tensor(x))
    img = vae.decode(Tensor(z))
    assert img.shape == (1, 3, 64, 64)
    errs = rel_err(mean.asnumpy(), mean_ref), rel_err(logvar.asnumpy(), logvar_ref), rel_err(img.asnumpy(), img_ref)
    print(f"\nSD-width VAE rel err: mean {errs[0]:.2e} logvar {errs[1]:.2e} decode {errs[2]:.2e}")
    assert max(errs) <= 1e-4


def test_legacy_attention_names_load(small, tmp_path, rng):
    """query/key/value/proj_attn names and 1x1-conv-shaped (C, C, 1, 1) attention weights."""
    folder, ref = small
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in read_state_dict(folder).items():
        for new, old in legacy.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(new, old)
                if key.endswith(("query.weight", "proj_attn.weight")):
                    value = value[:, :, None, None]
        state[key] = value
    assert "encoder.mid_block.attentions.0.query.weight" in state
    assert state["decoder.mid_block.attentions.0.proj_attn.weight"].ndim == 4
    write_safetensors(state, tmp_path / "diffusion_pytorch_model.safetensors")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    z = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    _, _, img_ref = torch_encode_decode(ref, np.zeros((1, 3, 8, 8), np.float32), z)
    assert rel_err(load_vae(tmp_path).decode(Tensor(z)).asnumpy(), img_ref) <= 1e-5


def test_graph_mode_matches_pynative(small, graph_mode, rng):
    folder, ref = small
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    z = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    mean_ref, _, img_ref = torch_encode_decode(ref, x, z)
    vae = load_vae(folder)
    img_graph, mean_graph = vae.decode(Tensor(z)).asnumpy(), vae.encode(Tensor(x))[0].asnumpy()
    backend.setup("CPU", "pynative")
    vae = load_vae(folder)
    img_py, mean_py = vae.decode(Tensor(z)).asnumpy(), vae.encode(Tensor(x))[0].asnumpy()
    errs = rel_err(img_graph, img_py), rel_err(mean_graph, mean_py), rel_err(img_graph, img_ref)
    print(f"\ngraph vs PyNative rel err: decode {errs[0]:.2e} encode {errs[1]:.2e}; graph vs diffusers {errs[2]:.2e}")
    assert max(errs) <= 1e-5


@pytest.mark.parity
def test_tiled_decode_matches_diffusers_tiling(small, rng):
    folder, ref = small
    tile, overlap, f = 8, 2, 2  # latent px; the small VAE upsamples by f = 2
    z = rng.standard_normal((1, 4, 20, 14)).astype(np.float32)  # 4 x 3 tiles, ragged at the far edges
    ref.enable_tiling()
    ref.tile_latent_min_size, ref.tile_sample_min_size, ref.tile_overlap_factor = tile, tile * f, overlap / tile
    try:
        with torch.no_grad():
            img_ref = ref.decode(torch.from_numpy(z)).sample.numpy()
    finally:
        ref.disable_tiling()
    vae = load_vae(folder)
    img = vae.decode_tiled(Tensor(z), tile=tile, overlap=overlap).asnumpy()
    untiled = vae.decode(Tensor(z)).asnumpy()
    assert img.shape == untiled.shape == (1, 3, 40, 28)
    err, seam = rel_err(img, img_ref), rel_err(img, untiled)
    print(f"\ntiled decode rel err vs diffusers tiled {err:.2e} (vs our untiled {seam:.2e})")
    assert err <= 1e-5
    small_z = z[:, :, :tile, :tile]  # fits one tile: plain decode
    np.testing.assert_array_equal(vae.decode_tiled(Tensor(small_z), tile, overlap).asnumpy(),
                                  vae.decode(Tensor(small_z)).asnumpy())


def test_fp16_close_to_fp32(small, rng):
    folder, _ = small
    z = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    vae16 = load_vae(folder, dtype="fp16")
    assert str(vae16.decoder.mid_block.resnets[0].norm1.weight.dtype) == "Float32"
    assert str(vae16.decoder.conv_in.weight.dtype) == "Float16"
    img16 = vae16.decode(Tensor(z)).asnumpy()
    assert img16.dtype == np.float32
    err = rel_err(img16, load_vae(folder).decode(Tensor(z)).asnumpy())
    print(f"\nfp16 (GroupNorm fp32) vs fp32 decode rel err {err:.2e}")
    assert err <= 1e-2


def test_wrong_architecture_is_a_checkpoint_error(small, tmp_path):
    folder, _ = small
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "block_out_channels": [64, 64]}))
    with pytest.raises(CheckpointError, match="shape mismatches") as e:
        load_vae(tmp_path)
    assert "encoder.conv_in.weight: checkpoint (32, 3, 3, 3) vs model (64, 3, 3, 3)" in str(e.value)
    n3 = {"block_out_channels": [32, 64, 64], "down_block_types": ["DownEncoderBlock2D"] * 3,
          "up_block_types": ["UpDecoderBlock2D"] * 3}
    (tmp_path / "config.json").write_text(json.dumps({**config, **n3}))
    with pytest.raises(CheckpointError, match="missing keys.*down_blocks"):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderTiny"}))
    with pytest.raises(CheckpointError, match="AutoencoderTiny"):
        load_vae(tmp_path)


def test_missing_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_vae(tmp_path / "nope")
    assert "nope" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="config.json"):
        load_vae(tmp_path)
