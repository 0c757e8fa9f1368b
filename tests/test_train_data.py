"""Training data: label validation, buckets, skipping bad images, the batch plan, sharding, per-sample draws, and the
feature cache against on-the-fly encoding (same inputs, same loss)."""
import json

import numpy as np
import pytest
from mindspore import Tensor

from pixart import demo_bundle as demo
from pixart.data.dataset import BatchStream, BucketDataset, DataError, load_labels
from pixart.data.features import FeatureCache, ImageEncoder, TextEncoder, extract_features
from pixart.training.batch import BATCH_KEYS, BatchBuilder, sample_draws, timestep_weights
from tests.synthetic import make_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    labels, images = make_dataset(root, per_kind_and_ratio=3)
    items = json.loads(labels.read_text())
    (images / "sub" / "corrupt.png").write_bytes(b"this is not a png")
    items.append({"path": "sub/corrupt.png", "prompt": "a red square", "height": 64, "width": 64, "ratio": 1.0})
    items.append({"path": "sub/missing.png", "prompt": "a red square", "height": 64, "width": 64, "ratio": 1.0})
    labels.write_text(json.dumps(items))
    return labels, images


def _write(tmp_path, items):
    p = tmp_path / "labels.json"
    p.write_text(json.dumps(items))
    return p


@pytest.mark.parametrize("items,message", [
    ([{"path": "a.png", "height": 8, "width": 8}], "entry 0 (a.png) is missing field 'prompt'"),
    ([{"prompt": "x", "height": 8, "width": 8, "ratio": 1}], "missing field 'path'"),
    ([{"path": "a.png", "prompt": "x", "height": 8}], "gives only one of 'height' and 'width'"),
    ([{"path": "a.png", "prompt": "x", "height": -1, "width": 8, "ratio": 1}], "bad 'height': -1"),
    ({"path": "a.png"}, "must be a non-empty JSON list"),
])
def test_label_file_errors_name_the_entry_and_field(tmp_path, items, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_labels(_write(tmp_path, items))


def test_buckets_skip_bad_images_and_report_them(data):
    labels, images = data
    ds = BucketDataset(labels, 256, images)
    assert len(ds) == 12 and {k: len(v) for k, v in ds.buckets.items()} == {"1.0": 6, "0.5": 6}
    assert ds.entries[0].size == (256, 256) and ds.buckets["0.5"] and ds.entries[ds.buckets["0.5"][0]].size == (176, 352)
    reasons = {s.path: s.reason for s in ds.skipped}
    assert reasons["sub/missing.png"] == "missing" and reasons["sub/corrupt.png"].startswith("unreadable")
    assert "skipped 2" in ds.summary() and "sub/corrupt.png" in ds.summary()
    with pytest.raises(DataError, match="batch = 8 is larger than every aspect-ratio bucket: the largest .* holds 6"):
        ds.check_batch_size(8, "batch")
    square = BucketDataset(labels, 256, images, multi_scale=False)  # fixed-size models: one square bucket
    assert list(square.buckets) == ["1.0"] and len(square) == 12


def test_an_image_that_fails_to_decode_is_replaced_deterministically(data, tmp_path):
    labels, images = data
    items = [i for i in json.loads(labels.read_text()) if i["height"] == 64 and "corrupt" not in i["path"]
             and "missing" not in i["path"]]
    good = images / items[0]["path"]
    truncated = images / "sub" / "truncated.png"
    data_bytes = good.read_bytes()
    truncated.write_bytes(data_bytes[:len(data_bytes) // 2])  # a valid header, then nothing: fails only on decode
    items.insert(0, {**items[0], "path": "sub/truncated.png"})
    ds = BucketDataset(_write(tmp_path, items), 256, images)
    assert len(ds) == len(items)  # the header check passes
    img, used = ds.image(0)
    assert used == 1 and img.shape == (3, 256, 256) and -1 <= img.min() and img.max() <= 1
    assert [f.path for f in ds.decode_failures] == ["sub/truncated.png"]
    assert ds.image(0)[1] == 1 and len(ds.decode_failures) == 1  # remembered, not retried


def test_batches_hold_one_bucket_and_ranks_split_the_global_batch(data):
    labels, images = data
    ds = BucketDataset(labels, 256, images)
    plan = ds.epoch_batches(0, 4, seed=5)
    assert len(plan) == ds.batches_per_epoch(4) == 2
    assert all(len({ds.entries[p].bucket for p in b}) == 1 and len(b) == 4 for b in plan)
    assert plan == ds.epoch_batches(0, 4, seed=5) and plan != ds.epoch_batches(1, 4, seed=5)
    single = BatchStream(ds, 4, seed=5)
    ranks = [BatchStream(ds, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):  # across an epoch boundary
        one, parts = next(single), [next(s) for s in ranks]
        assert one.positions == parts[0].positions + parts[1].positions
        assert one.slots == parts[0].slots + parts[1].slots and one.index == parts[0].index == parts[1].index
    resumed = BatchStream(ds, 4, seed=5, start=3)  # the data position is one integer
    fresh = BatchStream(ds, 4, seed=5)
    for _ in range(3):
        next(fresh)
    assert next(resumed).positions == next(fresh).positions


def test_per_sample_draws_depend_only_on_seed_batch_and_slot():
    a = sample_draws(1, 7, 3, (4, 2, 2), 0.5, 0.1, True, 1000)
    b = sample_draws(1, 7, 3, (4, 2, 2), 0.5, 0.1, True, 1000)
    c = sample_draws(1, 7, 4, (4, 2, 2), 0.5, 0.1, True, 1000)
    assert a.t == b.t and np.array_equal(a.noise, b.noise) and np.array_equal(a.posterior, b.posterior)
    assert not np.array_equal(a.noise, c.noise)
    drops = [sample_draws(0, i, 0, (1, 1, 1), 1.0, 0.1, False, 1000).drop for i in range(2000)]
    assert 0.08 < np.mean(drops) < 0.12  # classifier-free dropout at 0.1


def test_timestep_bias_and_offset_noise_draws():
    """diffusers' --timestep_bias_strategy weights, drawn from; offset noise adds one constant per channel and
    leaves every other draw as it was."""
    assert timestep_weights("none") is None
    w = timestep_weights("later", multiplier=5.0, portion=0.4)
    assert w.shape == (1000,) and abs(w.sum() - 1) < 1e-12 and w[999] == w[600] == 5 * w[599] == 5 * w[0]
    r = timestep_weights("range", multiplier=3.0, begin=200, end=300)
    assert r[200] == r[299] == 3 * r[300] == 3 * r[199]
    e = timestep_weights("earlier", multiplier=2.0, portion=0.25)
    assert e[249] == 2 * e[250]
    ts = np.array([sample_draws(0, i, 0, (1, 1, 1), 1.0, 0.0, False, 1000, w).t for i in range(3000)])
    assert abs(np.mean(ts >= 600) - 2.0 / 2.6) < 0.03 and ts.min() >= 0 and ts.max() <= 999  # 0.4*5 / (0.6 + 2)
    plain = sample_draws(3, 2, 1, (4, 3, 3), 0.5, 0.1, True, 1000)
    offset = sample_draws(3, 2, 1, (4, 3, 3), 0.5, 0.1, True, 1000, noise_offset=0.1)
    assert (plain.t, plain.drop, plain.flip) == (offset.t, offset.drop, offset.flip)
    assert np.array_equal(plain.posterior, offset.posterior)
    shift = offset.noise - plain.noise
    assert np.allclose(shift, shift[:, :1, :1], atol=1e-6) and 0 < np.abs(shift).max() < 0.5


def test_min_snr_weighting_of_the_noise_mse():
    """--snr_gamma: each sample's noise MSE times min(SNR_t, gamma) / SNR_t (diffusers' Min-SNR for epsilon)."""
    import mindspore as ms
    from mindspore import nn
    from pixart.diffusion.loss import DiffusionLoss
    from pixart.diffusion.schedule import default_schedule
    rng = np.random.default_rng(0)
    x0, noise, out = (ms.Tensor(rng.standard_normal((4, 4, 2, 2)).astype(np.float32)) for _ in range(3))
    t = np.array([5, 100, 500, 990], np.int32)
    plain = DiffusionLoss(nn.Cell(), learn_sigma=False)
    weighted = DiffusionLoss(nn.Cell(), learn_sigma=False, snr_gamma=5.0)
    args = (out, x0, x0, ms.Tensor(t), noise)
    mse, mse_w = plain.terms(*args)[1].asnumpy()[1], weighted.terms(*args)[1].asnumpy()[1]
    ac = np.asarray(default_schedule().alphas_cumprod)[t]
    snr = ac / (1 - ac)
    np.testing.assert_allclose(mse_w, mse * np.minimum(snr, 5.0) / snr, rtol=1e-5)
    assert mse_w[0] < 0.1 * mse[0] and mse_w[3] == pytest.approx(mse[3])  # low noise down-weighted, high noise not


def test_cache_and_on_the_fly_give_the_same_inputs_and_loss(data, tmp_path):
    """Same sample, same draws (caption choice, dropout, flip, timestep, both noises): the cached path and the
    on-the-fly path build the same batch, and the loss of a model on them agrees."""
    from pixart.diffusion.loss import DiffusionLoss
    from pixart.models.pixart import PixArt, preset_config
    labels, images = data
    items = [i for i in json.loads(labels.read_text()) if i["height"] == 64 and "sub/" in i["path"]
             and i["path"].split("/")[1][0] in "sc"][2:6]  # squares and circles, ratio 1.0
    sub = _write(tmp_path, items)
    bundle = demo.build(tmp_path / "demo", log=lambda *_: None) / demo.COMPONENTS
    kw = dict(vae_root=bundle / "vae", text_encoder_root=bundle / "text_encoder", tokenizer_root=bundle / "tokenizer")
    report = extract_features(sub, tmp_path / "cache", 256, images, True, max_length=120, flip=True, batch_size=3,
                              log=lambda *_: None, **kw)
    assert report["latents_written"] == 4 and report["text_written"] == 4  # 2 prompts + 2 sharegpt4v, deduplicated
    cache = FeatureCache(tmp_path / "cache")
    cache.check_compatible(256, True, 120, flip=True)
    ds = BucketDataset(sub, 256, images)
    options = dict(real_prompt_ratio=0.5, class_dropout_prob=0.5, random_flip=True)
    cached = BatchBuilder(ds, 0, 120, 0.5, cache=cache, **options)
    fly = BatchBuilder(ds, 0, 120, 0.5, text_encoder=TextEncoder(kw["text_encoder_root"], kw["tokenizer_root"], 120),
                       image_encoder=ImageEncoder(kw["vae_root"]), **options)
    ref = next(BatchStream(ds, 4, seed=0))
    a, b = cached(ref), fly(ref)
    draws = [sample_draws(0, ref.index, s, (4, 32, 32), 0.5, 0.5, True, 1000) for s in ref.slots]
    assert all({getattr(d, k) for d in draws} == {True, False} for k in ("flip", "real_prompt", "drop"))
    for k in ("t", "noise", "mask", "img_hw", "aspect_ratio", "drop"):
        assert np.array_equal(a[k], b[k]), k
    assert np.abs(a["x0"] - b["x0"]).max() < 1e-5 and np.abs(a["y"] - b["y"]).max() < 1e-5

    model = PixArt(preset_config("PixArt-XL-2-256x256", depth=1, hidden_size=72, num_heads=1, caption_channels=64))
    model.initialize_weights(0)
    rng = np.random.default_rng(0)
    for p in (model.final_layer.linear.weight, model.blocks[0].cross_attn.proj.weight):  # make the output depend on all
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.05))
    loss = DiffusionLoss(model)
    la = float(loss(*(Tensor(a[k]) for k in BATCH_KEYS))[0].asnumpy())
    lb = float(loss(*(Tensor(b[k]) for k in BATCH_KEYS))[0].asnumpy())
    print(f"cache vs on-the-fly: loss {la:.7f} vs {lb:.7f}, |x0 diff| {np.abs(a['x0'] - b['x0']).max():.2e}")
    assert abs(la - lb) < 1e-5 * max(1.0, abs(la))


def test_sharded_extraction_keeps_every_shards_skipped_report(data, tmp_path):
    """--num_shards: each shard writes its own skipped report (none overwrites another's), training reads them all,
    and a later unsharded run replaces them with one complete report."""
    from pixart.data.features import skipped_report_name
    labels, images = data
    items = json.loads(labels.read_text())
    good = [i for i in items if i["height"] == i["width"] and i["path"].startswith("sub/square")][:2]
    bad = [i for i in items if i["path"] in ("sub/corrupt.png", "sub/missing.png")]  # rejected at start-up
    truncated = []
    for name in ("truncated_a.png", "truncated_b.png"):  # a valid header, so they only fail while decoding
        whole = (images / good[0]["path"]).read_bytes()
        (images / "sub" / name).write_bytes(whole[:len(whole) // 2])
        truncated.append({**good[0], "path": f"sub/{name}"})
    sub = _write(tmp_path, [good[0], truncated[0], truncated[1], good[1], *bad])  # truncated_a: shard 1, _b: shard 0
    vae = demo.build(tmp_path / "demo", log=lambda *_: None) / demo.COMPONENTS / "vae"
    root = tmp_path / "cache"

    def extract(shard):
        return extract_features(sub, root, 256, images, True, vae_root=vae, text=False, shard=shard,
                                log=lambda *_: None)

    reports = [extract((k, 2)) for k in range(2)]
    assert [r["latents_written"] for r in reports] == [1, 1]
    assert sorted(p.name for p in root.glob("skipped*")) == [skipped_report_name((0, 2)), skipped_report_name((1, 2))]
    own = [{s["path"] for s in json.loads((root / skipped_report_name((k, 2))).read_text())} for k in range(2)]
    assert "sub/truncated_b.png" in own[0] - own[1] and "sub/truncated_a.png" in own[1] - own[0]
    expected = {"sub/truncated_a.png", "sub/truncated_b.png", "sub/corrupt.png", "sub/missing.png"}
    merged = FeatureCache(root).skipped
    assert set(merged) == expected and "truncated" in merged["sub/truncated_a.png"]
    assert FeatureCache(root).missing(next(e for e in BucketDataset(sub, 256, images).entries
                                           if e.path == "sub/truncated_a.png"), ("prompt",)).startswith(
        "not in the feature cache: OSError")

    again = extract((0, 1))  # one process over everything: its report replaces the shards'
    assert again["latents_cached"] == 2 and sorted(p.name for p in root.glob("skipped*")) == ["skipped.json"]
    assert set(FeatureCache(root).skipped) == expected
