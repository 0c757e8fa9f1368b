"""MindSpore `.ckpt`: a streamed reader (one copy of the weights at most), MindSpore's own reader as the fallback,
and atomic writes. Strings saved beside the tensors (MindSpore's `append_dict`) travel as metadata: that is where
`pixart.models.convert` records a model's architecture."""
from __future__ import annotations

import math
import os

import numpy as np
import mindspore as ms
from mindspore import log as ms_log

from .atomic import atomic_path, remove_quietly
from .base import CheckpointError, widen_bf16

_DTYPES = {"Float64": np.float64, "Float32": np.float32, "Float16": np.float16, "BFloat16": np.uint16,
           "Int64": np.int64, "Int32": np.int32, "Int16": np.int16, "Int8": np.int8, "UInt8": np.uint8,
           "Bool": np.bool_}
_STRING = "str"  # MindSpore's tensor type of an `append_dict` string, stored as UTF-32 (numpy's str dtype)


def _varint(buf, pos: int) -> tuple[int, int]:
    """The protobuf varint at buf[pos] and the position after it."""
    value = shift = 0
    while shift < 70:  # a varint is at most 10 bytes
        byte = buf[pos]
        pos, value, shift = pos + 1, value | (byte & 0x7F) << shift, shift + 7
        if byte < 0x80:
            return value, pos
    raise ValueError(f"varint longer than 10 bytes at byte {pos}")


def _protobuf_fields(buf, start: int, end: int):
    """(field number, wire type, value or offset, length) of each field of the protobuf message in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value, 0
        elif wire in (1, 2, 5):
            length, pos = _varint(buf, pos) if wire == 2 else (8 if wire == 1 else 4, pos)
            if pos + length > end:  # every length is bounded by the message that holds it
                raise ValueError(f"field {number} at byte {pos}: {length} bytes past the end of its message")
            yield number, wire, pos, length
            pos += length
        else:
            raise ValueError(f"wire type {wire} at byte {pos}")


def _tensor_proto(raw, start: int, end: int) -> tuple[list[int], str | None, tuple[int, int] | None]:
    """TensorProto {repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3} -> (dims, type,
    (offset, length) of the content)."""
    dims, dtype, content = [], None, None
    for number, wire, a, length in _protobuf_fields(raw, start, end):
        if number == 1 and wire == 0:
            dims.append(a)
        elif number == 1 and wire == 2:  # packed
            pos = a
            while pos < a + length:
                value, pos = _varint(raw, pos)
                dims.append(value)
        elif number == 2:
            dtype = bytes(raw[a:a + length]).decode()
        elif number == 3:
            content = (a, length)
    return dims, dtype, content


def _read_ckpt_stream(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A MindSpore .ckpt (protobuf `Checkpoint { repeated Value { string tag = 1; TensorProto tensor = 2 } }`) read
    from a map of the file, one tensor at a time: each tensor's bytes become one array, shared with the map where
    aligned to its item size, else read from the file into new memory once. The peak is one copy of the weights,
    where `ms.load_checkpoint` holds two (measurements: docs/benchmarks.md, 'Design measurements'). Consecutive
    values with the same tag (a large tensor saved in slices) are joined. Returns (tensors, strings). Raises
    ValueError on anything else (the caller falls back to MindSpore's reader, which also knows encrypted files)."""
    mm = np.memmap(path, np.uint8, "c")
    raw = mm.base  # the mmap object itself: byte access without numpy scalars
    state, strings, last = {}, {}, None
    with open(path, "rb") as file:  # unaligned tensors are read from it, not through the map (its pages count)
        for number, wire, start, length in _protobuf_fields(raw, 0, len(mm)):
            if (number, wire) != (1, 2):
                raise ValueError(f"unexpected top-level field {number}")
            tag, tensor = None, None
            for n, w, a, ln in _protobuf_fields(raw, start, start + length):
                if n == 1 and w == 2:
                    tag = bytes(raw[a:a + ln]).decode()
                elif n == 2 and w == 2:
                    tensor = _tensor_proto(raw, a, a + ln)
                else:
                    raise ValueError(f"value field {n} (a map tensor?) is not supported")
            if tag is not None and tensor is not None and tensor[1] == _STRING:
                offset, size = tensor[2] or (0, 0)
                strings[tag], last = bytes(raw[offset:offset + size]).decode("utf-32-le"), None
                continue
            if tag is None or tensor is None or tensor[1] not in _DTYPES or tensor[2] is None:
                raise ValueError(f"value {tag!r}: no tensor of a known dtype")
            dims, dtype, (offset, size) = tensor
            item = np.dtype(_DTYPES[dtype])
            if offset % item.itemsize == 0:
                arr = np.frombuffer(mm, item, size // item.itemsize, offset)
            else:
                file.seek(offset)
                arr = np.fromfile(file, item, size // item.itemsize)
            if tag == last:  # a slice of the previous tensor
                arr = np.concatenate([state[tag][0], arr])
            state[tag], last = (arr, dims, dtype), tag
    out = {}
    for tag, (arr, dims, dtype) in state.items():
        if math.prod(dims) != arr.size:
            raise ValueError(f"{tag}: {arr.size} values for dims {dims}")
        if dtype == "BFloat16":
            arr = widen_bf16(arr)
        out[tag] = arr.reshape(dims)
    return out, strings


def read_ckpt_with_metadata(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A MindSpore .ckpt as ({name: array}, {name: string}): streamed from a map of the file, or through
    `ms.load_checkpoint` where the streamed reader does not understand the file."""
    try:
        return _read_ckpt_stream(path)
    except (ValueError, IndexError, UnicodeDecodeError, OSError):
        pass
    try:
        params = ms.load_checkpoint(str(path))
    except Exception as e:  # MindSpore raises bare ValueError/RuntimeError with long traces
        raise CheckpointError(f"{path}: not a readable MindSpore checkpoint ({str(e).splitlines()[0]})") from None
    return ({k: v.asnumpy() for k, v in params.items() if not isinstance(v, str)},
            {k: v for k, v in params.items() if isinstance(v, str)})


def read_ckpt(path) -> dict[str, np.ndarray]:
    """The tensors of a MindSpore .ckpt as {name: array} (see `read_ckpt_with_metadata`)."""
    return read_ckpt_with_metadata(path)[0]


def write_ckpt(state: dict[str, np.ndarray], path, metadata: dict[str, str] | None = None) -> None:
    """Save `{name: array}` as a MindSpore .ckpt atomically (`atomic_path`: a failed write leaves no file and the
    previous one intact, and raises the OSError naming `path`); `metadata` strings go into MindSpore's
    `append_dict` (read back by `read_ckpt_with_metadata`, and by `ms.load_checkpoint` as str values)."""
    with atomic_path(path, ".ckpt") as tmp:
        mindspore_tmp = tmp.with_suffix(".tmp")  # MindSpore's own temporary name for `tmp`
        logger = ms_log._get_logger()  # its failure message would be a second line beside ours
        quiet, logger.disabled = logger.disabled, True
        try:
            ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in state.items()], str(tmp),
                               append_dict=dict(metadata) if metadata else None)
        except OSError as e:
            remove_quietly(mindspore_tmp)
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        except BaseException:
            remove_quietly(mindspore_tmp)
            raise
        finally:
            logger.disabled = quiet
        os.chmod(tmp, 0o644)  # MindSpore writes 0400
