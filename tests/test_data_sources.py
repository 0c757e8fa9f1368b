"""The data layer's sources (pixart.data.sources): the same 16 synthetic images and captions written as a label JSON
with and without sizes, a `datasets` save_to_disk folder, an imagefolder with metadata.jsonl, an image folder with
.txt captions and two webdataset shards give the same batches (bucket, pixels, captions) in the same order, shard
and resume the same way, and bad input is one clear error; TensorBoard events read back with TensorBoard's own
EventAccumulator."""
import json
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest

from pixart.cli.options import ArgumentParser, add_data_group, parse_args
from pixart.data.dataset import BatchStream, BucketDataset
from pixart.data.sources import DataError, check_data_args, open_source, source_from_args
from tests.data_formats import as_argv, write_formats

FORMATS = ["json", "json_nosize", "txt_folder", "imagefolder", "save_to_disk", "webdataset"]


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    return write_formats(tmp_path_factory.mktemp("formats"))


def dataset(options: dict, resolution: int = 256) -> BucketDataset:
    p = ArgumentParser()
    add_data_group(p)
    return BucketDataset(source_from_args(parse_args(p, as_argv(options))), resolution)


def test_every_format_gives_the_same_batches(formats):
    ref = dataset(formats["json"])
    assert len(ref) == 16 and sorted(ref.buckets) == ["0.5", "1.0"]
    ref_batches = [ref.epoch_batches(epoch, 4, seed=7) for epoch in range(2)]
    ref_pixels = [ref.image(pos)[0] for pos in range(len(ref))]
    for name in FORMATS[1:]:
        ds = dataset(formats[name])
        assert [(e.bucket, e.size, e.prompt, e.height, e.width) for e in ds.entries] == \
            [(e.bucket, e.size, e.prompt, e.height, e.width) for e in ref.entries], name
        assert [ds.epoch_batches(epoch, 4, seed=7) for epoch in range(2)] == ref_batches, name
        for pos in range(len(ds)):
            assert np.array_equal(ds.image(pos)[0], ref_pixels[pos]), (name, pos)
        assert not ds.skipped, name


@pytest.mark.parametrize("name", ["webdataset", "save_to_disk", "txt_folder"])
def test_ranks_and_resume_read_the_same_samples_on_every_source(formats, name):
    ds = dataset(formats[name])
    whole = [r.positions for r, _ in zip(BatchStream(ds, 4, seed=3), range(10))]  # past one epoch (4 batches)
    ranks = [[r.positions for r, _ in zip(BatchStream(ds, 2, seed=3, rank=k, world_size=2), range(10))]
             for k in range(2)]
    assert [a + b for a, b in zip(*ranks)] == whole
    resumed = [r.positions for r, _ in zip(BatchStream(ds, 4, seed=3, start=5), range(5))]
    assert resumed == whole[5:]


def test_sizes_are_read_from_the_image_header_not_decoded(formats, monkeypatch):
    from PIL import ImageFile
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1))
    ds = dataset(formats["json_nosize"])
    assert not loads and {(e.height, e.width) for e in ds.entries} == {(64.0, 64.0), (48.0, 96.0)}


def test_max_train_samples_and_caption_column_default(formats):
    ds = dataset({**formats["save_to_disk"], "--max_train_samples": 5})
    assert len(ds) == 5
    cols = {k: v for k, v in formats["save_to_disk"].items() if k != "--caption_column"}
    assert dataset(cols).entries[0].prompt  # no --caption_column: 'text' is absent, the reference's 'en_text' used


def _args(**kw):
    base = dict(json_path=None, image_dir=None, dataset_name=None, dataset_config_name=None, train_data_dir=None,
                image_column="image", caption_column=None, max_train_samples=None, feature_dir=None)
    return SimpleNamespace(**{**base, **kw})


def test_bad_sources_are_one_clear_error(formats, tmp_path):
    with pytest.raises(DataError, match=r"--caption_column 'caption' is not a column of .*; its columns: image, "
                                        r"en_text, zh_text"):
        dataset({**formats["save_to_disk"], "--caption_column": "caption"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images in .*empty"):
        BucketDataset(open_source(train_data_dir=tmp_path / "empty"), 256)
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "a.txt").write_text("a caption")
    with pytest.raises(DataError, match=r"a.txt: a caption file without an image"):
        BucketDataset(open_source(train_data_dir=orphan), 256)
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(DataError, match=r"bad.tar is not a tar file"):
        BucketDataset(open_source(train_data_dir=str(tmp_path / "bad.tar")), 256)
    with pytest.raises(DataError, match="no such-owner/no-such-set|not a local folder"):
        open_source(dataset_name="no-such-owner/no-such-set")
    with pytest.raises(DataError, match="give one data source"):
        check_data_args(_args(json_path="x.json", dataset_name="y"))
    with pytest.raises(DataError, match="no training data: give --json_path"):
        check_data_args(_args())


def test_corrupt_images_in_a_shard_are_skipped_and_counted(tmp_path):
    from PIL import Image
    import io
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(good, "PNG")
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for key, data in (("a.png", good.getvalue()), ("a.txt", b"red"), ("b.png", b"broken"), ("b.txt", b"x"),
                          ("c.txt", b"caption only")):
            info = tarfile.TarInfo(key)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = BucketDataset(open_source(train_data_dir=str(tmp_path / "s.tar")), 256)
    assert [e.path for e in ds.entries] == ["s.tar/a"]
    reasons = {s.path: s.reason for s in ds.skipped}
    assert reasons["s.tar/b"].startswith("unreadable") and reasons["s.tar/c"] == "no image in the shard"
    assert ds.summary().count("skipped 2")


def test_tensorboard_events_read_back_with_event_accumulator(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from pixart.training.log import Logger
    ctx = SimpleNamespace(is_main=True, rank=0, world_size=1)
    log = Logger(tmp_path, ctx, None, "tensorboard")
    for step in range(1, 5):
        log.record({"step": step, "loss": 1.0 / step, "lr": 1e-4, "grad_norm": 0.5, "loss_scale": 1.0,
                    "images_per_s": 3.0, "bucket": "1.0", "skipped": False})
    Image.new("RGB", (16, 8), (0, 128, 255)).save(tmp_path / "v.png")
    log.images(2, [tmp_path / "v.png"])
    log.close()
    log = Logger(tmp_path, ctx, 2, "tensorboard")  # resumed at step 2: TensorBoard drops the old steps 3, 4
    log.record({"step": 3, "loss": 0.25, "lr": 1e-4})
    log.close()
    acc = EventAccumulator(str(tmp_path / "logs"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert loss == pytest.approx({1: 1.0, 2: 0.5, 3: 0.25})
    assert {"train/lr", "train/grad_norm", "train/loss_scale", "train/images_per_s"} <= set(acc.Tags()["scalars"])
    img = acc.Images("validation/00")[0]
    assert (img.step, img.width, img.height) == (2, 16, 8)
    assert json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_make_labels_writes_the_label_json_with_sizes(formats, tmp_path):
    from pixart.cli import main
    from pixart.cli.make_labels import build_parser, run
    folder = formats["txt_folder"]["--train_data_dir"]
    out = tmp_path / "labels.json"
    assert main(run, build_parser, None, ["--image_dir", str(folder), "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads(formats["json"]["--json_path"].read_text())
    csv = tmp_path / "captions.csv"
    items = json.loads(out.read_text())
    csv.write_text("file_name,text\n" + "".join(f"{it['path']},{it['prompt']}\n" for it in items))
    out2 = tmp_path / "from_csv.json"
    assert main(run, build_parser, None, ["--image_dir", str(folder), "--captions_csv", str(csv),
                                          "--output", str(out2)]) == 0
    assert json.loads(out2.read_text()) == items
    bad = tmp_path / "bad.csv"
    bad.write_text("name,words\na.png,x\n")
    assert main(run, build_parser, None, ["--image_dir", str(folder), "--captions_csv", str(bad),
                                          "--output", str(tmp_path / "no.json")]) == 1
    assert not (tmp_path / "no.json").exists()


def test_webdataset_ranks_read_only_their_own_shards_per_epoch_and_resume_exactly(formats, monkeypatch):
    from pixart.data.dataset import RankShards, open_dataset, rank_shards
    from pixart.data.sources import ShardSource
    indexed = []
    index = ShardSource._index
    monkeypatch.setattr(ShardSource, "_index", staticmethod(lambda shard: indexed.append(shard.name) or index(shard)))
    source = lambda: source_from_args(parse_args(_parser(), as_argv(formats["webdataset"])))  # noqa: E731
    deals = [[rank_shards(2, 2, r, seed=3, epoch=e) for r in range(2)] for e in range(4)]
    assert all(sorted(a + b) == [0, 1] for a, b in deals) and len({tuple(d[0]) for d in deals}) == 2
    streams, counts = [], []
    for rank in range(2):
        ds = open_dataset(source(), 256, rank=rank, world_size=2, seed=3)
        assert isinstance(ds, RankShards) and len(ds) == 8
        counts.append(ds.batches_per_epoch(2))
    for rank in range(2):
        indexed.clear()
        ds = open_dataset(source(), 256, rank=rank, world_size=2, seed=3)
        stream = BatchStream(ds, 2, seed=3, rank=rank, world_size=2, agree=lambda n: min(counts))
        assert stream.per_epoch == min(counts)
        refs = [r for r, _ in zip(stream, range(3 * stream.per_epoch + 1))]
        for ref in refs:  # every sample comes from a shard dealt to this rank in that epoch, and only those are read
            mine = {f"shard-{i:03d}.tar" for i in deals[ref.epoch][rank]}
            assert {e.path.split("/")[0] for e in ref.entries} <= mine, (rank, ref.epoch)
            assert ref.slots == [2 * rank, 2 * rank + 1] and len({e.bucket for e in ref.entries}) == 1
        assert set(indexed) == {f"shard-{i:03d}.tar" for e in range(4) for i in deals[e][rank]}
        streams.append([[e.path for e in r.entries] for r in refs])
        resumed = BatchStream(open_dataset(source(), 256, rank=rank, world_size=2, seed=3), 2, seed=3, rank=rank,
                              world_size=2, start=5, agree=lambda n: min(counts))
        assert [[e.path for e in r.entries] for r, _ in zip(resumed, range(len(refs) - 5))] == streams[rank][5:]
    epoch0 = [{p for b in s[:min(counts)] for p in b} for s in streams]
    assert not epoch0[0] & epoch0[1]  # the ranks' data in an epoch are disjoint
    with pytest.raises(DataError, match=r"^2 webdataset shard\(s\) cannot be dealt evenly to 3 ranks: .*run 1, 2 "):
        open_dataset(source(), 256, rank=0, world_size=3, seed=3)


def _parser():
    p = ArgumentParser()
    add_data_group(p)
    return p
