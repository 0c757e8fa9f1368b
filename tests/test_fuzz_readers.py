"""Fuzzing the readers of every file format parsed here by hand (the safetensors header, the `.ckpt` protobuf,
state.json, the label JSON, an HF config.json): corrupted copies of valid files, truncated and random ones must
end in the reader's documented error (CheckpointError / DataError, each a ValueError with a one-line message),
never in another exception, a huge allocation or a hang.

Bounded: hypothesis with a fixed seed (`derandomize=True`, so a failure reproduces; no example database) and a
fixed number of examples per reader (120 byte-level, 60 JSON documents), a few seconds in all.
"""
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixart.data.sources import DataError, load_labels
from pixart.io import CheckpointError, read_config, read_safetensors, read_safetensors_metadata, write_safetensors
from pixart.io.ckpt import _read_ckpt_stream
from pixart.training.checkpoint import read_state

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
FUZZ_JSON = settings(FUZZ, max_examples=60)  # JSON documents cost more to generate than byte edits


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """One folder per reader, its file rewritten by every example (a folder per example would cost more than the
    read)."""
    return tmp_path_factory.mktemp("fuzz")


def _valid_safetensors(tmp) -> bytes:
    path = tmp / "valid.safetensors"
    write_safetensors({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}, path,
                      metadata={"k": "v"})
    return path.read_bytes()


def _valid_ckpt() -> bytes:
    """A MindSpore .ckpt as protobuf: Checkpoint { Value { tag = 1; TensorProto tensor = 2 } }, written by hand
    so the fuzz needs no MindSpore save."""
    def varint(n):
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    def field(number, payload):
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    def value(tag, arr):
        dims = b"".join(varint(1 << 3) + varint(d) for d in arr.shape)
        tensor = dims + field(2, b"Float32") + field(3, arr.astype(np.float32).tobytes())
        return field(1, field(1, tag.encode()) + field(2, tensor))
    return value("w", np.arange(12, dtype=np.float32).reshape(3, 4)) + value("b", np.ones(3, np.float32))


def _mutate(data: bytes, edits, cut) -> bytes:
    buf = bytearray(data)
    for pos, byte in edits:
        if buf:
            buf[pos % len(buf)] = byte
    return bytes(buf[:cut] if cut is not None else buf)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6)
CUT = st.one_of(st.none(), st.integers(0, 400))


def test_the_valid_files_read(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(_valid_safetensors(tmp_path))
    assert read_safetensors(path)["a"].shape == (2, 3) and read_safetensors_metadata(path) == {"k": "v"}
    path = tmp_path / "x.ckpt"
    path.write_bytes(_valid_ckpt())
    state, _ = _read_ckpt_stream(path)
    assert state["w"].tolist() == np.arange(12).reshape(3, 4).tolist()


@FUZZ
@given(edits=EDITS, cut=CUT, header=st.one_of(st.none(), st.integers(0, 1 << 64 - 1)))
def test_safetensors_reader_fails_only_with_checkpoint_error(scratch, edits, cut, header):
    tmp = scratch
    data = _mutate(_valid_safetensors(tmp), edits, cut)
    if header is not None and len(data) >= 8:
        data = struct.pack("<Q", header) + data[8:]
    path = tmp / "f.safetensors"
    path.write_bytes(data)
    try:
        read_safetensors_metadata(path)
        state = read_safetensors(path)
        for arr in state.values():
            np.asarray(arr).sum()  # the maps are valid memory
    except CheckpointError:
        pass


@FUZZ
@given(edits=EDITS, cut=CUT)
def test_ckpt_stream_reader_fails_only_with_value_error(scratch, edits, cut):
    """The streamed reader raises ValueError (or IndexError / UnicodeDecodeError / OSError, which read_ckpt turns
    into a fall back to MindSpore's reader, then a CheckpointError) on anything it does not understand."""
    path = scratch / "f.ckpt"
    path.write_bytes(_mutate(_valid_ckpt(), edits, cut))
    try:
        state, _ = _read_ckpt_stream(path)
        for arr in state.values():
            np.asarray(arr).sum()
    except (ValueError, IndexError, UnicodeDecodeError, OSError):
        pass


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_subnormal=False) | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=4), max_leaves=12)
STATE_KEYS = st.sampled_from(["step", "batches_done", "data", "args", "skipped", "optimizer", "epoch", "x"])


@FUZZ_JSON
@given(doc=st.one_of(JSONISH, st.dictionaries(STATE_KEYS, JSONISH, max_size=6)), edits=EDITS)
def test_state_json_reader_fails_only_with_checkpoint_error(scratch, doc, edits):
    folder = scratch
    (folder / "state.json").write_bytes(_mutate(json.dumps(doc).encode(), edits, None))
    try:
        state = read_state(folder)
        assert isinstance(state, dict) and isinstance(state["step"], int) and isinstance(state["batches_done"], int)
    except CheckpointError:
        pass


LABEL_KEYS = st.sampled_from(["path", "prompt", "sharegpt4v", "height", "width", "ratio"])


@FUZZ_JSON
@given(doc=st.one_of(JSONISH, st.lists(st.dictionaries(LABEL_KEYS, JSONISH, max_size=6), max_size=4)),
       edits=EDITS)
def test_label_and_config_readers_fail_only_with_their_errors(scratch, doc, edits):
    folder = scratch
    raw = _mutate(json.dumps(doc).encode(), edits, None)
    (folder / "labels.json").write_bytes(raw)
    (folder / "config.json").write_bytes(raw)
    try:
        for item in load_labels(folder / "labels.json"):
            assert isinstance(item, dict) and isinstance(item["path"], str)
    except DataError:
        pass
    try:
        assert isinstance(read_config(folder), dict)
    except CheckpointError:
        pass


@pytest.mark.parametrize("size", [0, 7, 8, 5000])
def test_random_bytes_are_refused_by_every_weight_reader(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "r.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_safetensors(path)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_finite_weights_are_found_by_their_bits(dtype):
    """The loaders' NaN / inf check reads each float's exponent bits (integer max, chunked): every NaN and infinity
    of each width is found wherever it sits (in a later chunk, in a strided view), and no finite value is flagged
    (the largest, -0, subnormals)."""
    from pixart.io.base import first_non_finite
    info = np.finfo(dtype)
    finite = np.array([info.max, -info.max, -0.0, 0.0, info.tiny, info.tiny / 4, -info.tiny / 4, 1.0], dtype)
    assert first_non_finite({"a": finite, "b": np.ones((3, 4), dtype)}, chunk=3) is None
    for bad in (np.nan, np.inf, -np.inf, -np.nan):
        for where in (0, 5, 999):
            x = np.zeros(1000, dtype)
            x[where] = bad
            assert first_non_finite({"ok": finite, "x": x}, chunk=7) == "x", (bad, where)
            assert first_non_finite({"t": x.reshape(10, 100).T}) == "t"
