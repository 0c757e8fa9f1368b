"""T5 encoder parity with transformers' T5EncoderModel, loading (plain, sharded, full T5, errors), fp16, tokenizer."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from mindspore import Tensor
from transformers import AutoTokenizer
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel as HFT5EncoderModel
from transformers import T5ForConditionalGeneration
from transformers.initialization import no_init_weights
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from pixart import backend
from pixart.io import CheckpointError, read_safetensors, write_safetensors
from pixart.models.t5 import load_t5, relative_position_buckets
from pixart.models.t5_tokenizer import encode_prompts, load_tokenizer, make_tiny_tokenizer
from tests.utils import rel_err

TINY = dict(vocab_size=200, d_model=64, d_kv=16, d_ff=96, num_layers=3, num_heads=4,
            relative_attention_max_distance=16)  # a short max distance so 40 tokens reach the far buckets


def hf_folder(path, feed_forward_proj="gated-gelu", seed=0, cls=HFT5EncoderModel, **overrides):
    """Save a random HF T5 to `path`; return the torch model."""
    shards = {"max_shard_size": "40KB"} if overrides.pop("sharded", False) else {}
    torch.manual_seed(seed)
    model = cls(HFT5Config(**{**TINY, **overrides}, feed_forward_proj=feed_forward_proj)).eval()
    model.save_pretrained(path, **shards)
    return model


def padded_batch(vocab, n=40, lengths=(40, 25, 7), seed=0):
    """ids (B, n) int32 with pad id 0 after each row's length, mask (B, n) int32."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(n)[None] < np.array(lengths)[:, None]).astype(np.int32)
    ids = rng.integers(3, vocab, (len(lengths), n)).astype(np.int32) * mask
    return ids, mask


def hf_encode(model, ids, mask):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()


def ms_encode(model, ids, mask):
    return model(Tensor(ids), Tensor(mask)).asnumpy().astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, HF reference output, ids, mask) for a 3-layer gated-gelu T5 v1.1."""
    folder = tmp_path_factory.mktemp("t5tiny")
    hf = hf_folder(folder)
    ids, mask = padded_batch(TINY["vocab_size"])
    return folder, hf_encode(hf, ids, mask), ids, mask


@pytest.mark.parity
def test_relative_position_buckets_match_hf():
    rel = torch.arange(600)[None, :] - torch.arange(600)[:, None]
    for buckets, distance in [(32, 128), (32, 16), (64, 256)]:
        ref = HFT5Attention._relative_position_bucket(rel, True, buckets, distance).numpy()
        np.testing.assert_array_equal(relative_position_buckets(600, buckets, distance), ref)


@pytest.mark.parity
def test_parity_with_padding(tiny):
    folder, ref, ids, mask = tiny
    model = load_t5(folder)
    out = ms_encode(model, ids, mask)
    err = rel_err(out, ref)
    print(f"tiny gated-gelu fp32 rel_err {err:.2e}")
    assert out.shape == (3, 40, TINY["d_model"]) and err <= 1e-5
    other = ids.copy()
    other[mask == 0] = 7  # what sits under padding must not change the real tokens' outputs
    assert np.array_equal(ms_encode(model, other, mask)[mask == 1], out[mask == 1])


@pytest.mark.parity
def test_parity_relu_t5(tmp_path):
    hf = hf_folder(tmp_path, feed_forward_proj="relu")
    ids, mask = padded_batch(TINY["vocab_size"])
    err = rel_err(ms_encode(load_t5(tmp_path), ids, mask), hf_encode(hf, ids, mask))
    print(f"tiny relu fp32 rel_err {err:.2e}")
    assert err <= 1e-5


def test_sharded_folder(tmp_path, tiny):
    _, ref, ids, mask = tiny
    hf_folder(tmp_path, sharded=True)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert rel_err(ms_encode(load_t5(tmp_path), ids, mask), ref) <= 1e-5


def test_full_t5_folder_ignores_decoder_and_tied_name(tmp_path, tiny):
    """A T5ForConditionalGeneration folder (decoder.*, lm_head) and `encoder.embed_tokens` instead of `shared`."""
    _, ref, ids, mask = tiny
    full = hf_folder(tmp_path / "full", cls=T5ForConditionalGeneration)
    assert rel_err(ms_encode(load_t5(tmp_path / "full"), ids, mask), hf_encode(full.encoder, ids, mask)) <= 1e-5
    folder, _, _, _ = tiny
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    shutil.copy(folder / "config.json", renamed)
    state = read_safetensors(folder / "model.safetensors")
    state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
    write_safetensors(state, renamed / "model.safetensors")
    assert rel_err(ms_encode(load_t5(renamed), ids, mask), ref) <= 1e-5


@pytest.mark.parity
def test_one_layer_at_xxl_width(tmp_path, graph_mode):
    """T5-XXL's width (d_model 4096, 64 heads, d_ff 10240), one layer; graph mode, as PyNative is slow at this size."""
    cfg = HFT5Config(**{**TINY, "vocab_size": 256, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 1,
                        "num_heads": 64, "relative_attention_max_distance": 128})
    with no_init_weights():  # HF's own init takes ~10 s here; uniform noise of the same scale is enough
        hf = HFT5EncoderModel(cfg).eval()
    hf.tie_weights()  # skipped with the init; ties encoder.embed_tokens to shared
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5, generator=g)
            else:  # variance 1 / fan_in
                p.uniform_(-1, 1, generator=g).mul_((3 / p.shape[-1]) ** 0.5)
    hf.save_pretrained(tmp_path)
    ids, mask = padded_batch(256, n=32, lengths=(32, 20))
    err = rel_err(ms_encode(load_t5(tmp_path), ids, mask), hf_encode(hf, ids, mask))
    print(f"XXL-width layer fp32 rel_err {err:.2e}")
    assert err <= 1e-4


def test_graph_mode_matches_pynative(graph_mode, tiny):
    folder, ref, ids, mask = tiny
    model = load_t5(folder)
    graph = ms_encode(model, ids, mask)
    backend.setup("CPU", "pynative")
    pynative = ms_encode(model, ids, mask)
    err = rel_err(graph, pynative)
    print(f"graph vs PyNative rel_err {err:.2e}, graph vs HF {rel_err(graph, ref):.2e}")
    assert err <= 1e-6 and rel_err(graph, ref) <= 1e-5


def test_fp16_and_bf16(tiny, tmp_path):
    folder, ref, ids, mask = tiny
    model = load_t5(folder, "fp16")
    half = {p.name for p in model.get_parameters() if str(p.dtype) == "Float16"}  # on CPU: Linear weights, tables
    assert half == {p.name for p in model.get_parameters() if not p.name.endswith("layer_norm.weight")}
    assert {str(p.dtype) for p in model.get_parameters()} == {"Float16", "Float32"}
    err = rel_err(ms_encode(model, ids, mask), ref)
    print(f"fp16 vs HF fp32 rel_err {err:.2e}")
    assert err <= 1e-2
    # bf16: tests/test_bf16.py (computed where the CPU has AVX512_BF16, refused where it lacks it)
    # T5 v1.1's FFN output overflows fp16 in real checkpoints: wo runs in fp32, so fp16 weights stay finite
    state = read_safetensors(folder / "model.safetensors")
    for k in state:
        if k.endswith("DenseReluDense.wo.weight"):
            state[k] = state[k] * 3e4
    shutil.copy(folder / "config.json", tmp_path)
    write_safetensors(state, tmp_path / "model.safetensors")
    big32, big16 = ms_encode(load_t5(tmp_path), ids, mask), ms_encode(load_t5(tmp_path, "fp16"), ids, mask)
    assert np.isfinite(big16).all() and rel_err(big16, big32) <= 1e-2


def test_checkpoint_errors(tmp_path, tiny):
    folder, _, ids, mask = tiny
    shutil.copy(folder / "model.safetensors", tmp_path)
    with pytest.raises(CheckpointError, match="config.json"):
        load_t5(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_layers": 2, "d_ff": 128}))
    with pytest.raises(CheckpointError) as e:
        load_t5(tmp_path)
    msg = str(e.value)
    assert "unexpected keys" in msg and "encoder.block.2.layer.0.SelfAttention.q.weight" in msg
    assert "shape mismatches" in msg and "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in msg
    with pytest.raises(ValueError, match="max_positions"):
        load_t5(folder, max_positions=16)(Tensor(ids), Tensor(mask))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_t5(tmp_path)


def test_tokenizer(tmp_path):
    make_tiny_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    prompts = ["a small cat riding a horse on the moon", "a lighthouse", "a very " * 40 + "long prompt"]
    ids, mask = encode_prompts(tok, prompts, max_length=24)
    assert ids.shape == mask.shape == (3, 24) and ids.dtype == mask.dtype == np.int32
    lengths = mask.sum(1)
    assert lengths[2] == 24 and lengths[1] < lengths[0] < 24
    for row, m, n in zip(ids, mask, lengths):
        assert (m[:n] == 1).all() and (m[n:] == 0).all() and row[n - 1] == 1 and (row[n:] == 0).all()
    ref = AutoTokenizer.from_pretrained(str(tmp_path))(prompts, padding="max_length", max_length=24, truncation=True,
                                                       add_special_tokens=True, return_tensors="np")
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spiece.model"))
    assert list(ids[0, :lengths[0]]) == sp.encode(prompts[0]) + [1]
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_tokenizer(tmp_path / "nothing")


# prompts where a tokenizer could differ from transformers': spaces, case, unicode, digits, punctuation, special
# tokens written in the text, an empty prompt, one that ends with </s>, and ones longer than max_length
_ODD_PROMPTS = ["a small cat riding a horse on the moon", "  two   spaces\tand a tab \n newline  ", "", "x",
                "Café, naïve ÅNGSTRÖM – “quotes” 3.14 km/h #1!", "日本の猫", "a </s> b", "a cat</s>", "<pad><unk>z",
                "a very " * 40 + "long prompt", "a, b; c: d? e! (f) [g] {h} 'i' \"j\"", "emoji 🐱 here"]


@pytest.mark.parametrize("layout", ["spiece.model", "tokenizer.json", "sentinels"])
def test_tokenizer_ids_equal_transformers(tmp_path, layout):
    """Our T5 tokenizer (no transformers import) gives transformers' ids, masks and decoded text, from a
    SentencePiece model, from a tokenizer.json that transformers saved, and with <extra_id_N> sentinels."""
    make_tiny_tokenizer(tmp_path / "spm")
    folder = tmp_path / "spm"
    if layout == "sentinels":
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "extra_ids": 5}))
    if layout == "tokenizer.json":
        used = AutoTokenizer.from_pretrained(str(folder))
        used(["a cat"], padding="max_length", max_length=40, truncation=True)  # its tokenizer.json then keeps these
        used.save_pretrained(str(tmp_path / "fast"))
        (tmp_path / "fast" / "spiece.model").unlink(missing_ok=True)
        folder = tmp_path / "fast"
        assert (folder / "tokenizer.json").exists()
    ref, ours = AutoTokenizer.from_pretrained(str(folder)), load_tokenizer(folder)
    prompts = _ODD_PROMPTS + (["<extra_id_0> a <extra_id_4>b"] if layout == "sentinels" else [])
    assert (ours.pad_token_id, ours.eos_token_id, ours.unk_token_id) == (
        ref.pad_token_id, ref.eos_token_id, ref.unk_token_id)
    for max_length in (8, 120):
        ids, mask = encode_prompts(ours, prompts, max_length)
        want_ids, want_mask = encode_prompts(ref, prompts, max_length)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(mask, want_mask)
    full = ours(prompts, add_special_tokens=True, truncation=False)["input_ids"]
    assert full == ref(prompts, add_special_tokens=True, truncation=False)["input_ids"]
    assert len(full[9]) > 120  # the long prompt is cut above
    for row in full:
        for skip in (True, False):
            assert ours.decode(row, skip_special_tokens=skip) == ref.decode(row, skip_special_tokens=skip)
    ours.save_pretrained(tmp_path / "saved")
    np.testing.assert_array_equal(encode_prompts(AutoTokenizer.from_pretrained(str(tmp_path / "saved")), prompts, 120)[0],
                                  encode_prompts(ref, prompts, 120)[0])


def test_tokenizer_does_not_import_torch_or_transformers(tmp_path):
    """The runtime path never imports PyTorch; transformers would (about 3 s per process)."""
    make_tiny_tokenizer(tmp_path)
    code = ("import sys, pixart.cli.sample; from pixart.models.t5_tokenizer import load_tokenizer, encode_prompts; "
            f"encode_prompts(load_tokenizer({str(tmp_path)!r}), ['a cat'], 8); "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
