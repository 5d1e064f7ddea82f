"""Frame codec for inter-process paths in ``deploy/``: a small JSON header plus raw array bytes; never pickle.

Frame on a stream: ``LENGTH`` (little-endian uint32 body size) + body. Body: ``LENGTH`` (JSON size) + UTF-8 JSON
``{"meta": {...}, "arrays": [{"name", "dtype", "shape"}, ...]}`` + each array's bytes in that order, C-contiguous and
little-endian (dtype strings as numpy writes them: ``"<f8"``, ``"|u1"``, ``"|b1"``). Decoding checks every field and
the exact byte count, so a corrupt or foreign frame raises a ``WireError`` naming what is wrong.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

LENGTH = struct.Struct("<I")
MAX_FRAME_BYTES = 1 << 30  # a larger length means a desynchronised or foreign stream, not a real frame
KINDS = "bifu"  # bool, int, uint, float: fixed-size numbers only (no object, string or void dtypes)

Frame = tuple[dict[str, Any], dict[str, np.ndarray]]


class WireError(ValueError):
    """A frame that cannot be encoded or decoded; the message names the bad field."""


def encode(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> bytes:
    """``meta`` (JSON values, finite floats) and ``arrays {name: ndarray}`` -> frame body."""
    entries, blobs = [], []
    for name, value in (arrays or {}).items():
        array = np.asarray(value)
        if array.dtype.kind not in KINDS:
            raise WireError(f"array {name!r} has dtype {array.dtype}; only bool, int, uint and float dtypes")
        array = array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)  # keeps 0-d shapes
        entries.append({"name": str(name), "dtype": array.dtype.str, "shape": list(array.shape)})
        blobs.append(array.tobytes())
    try:
        text = json.dumps({"meta": dict(meta), "arrays": entries}, allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise WireError(f"frame meta is not JSON-serialisable (finite numbers only): {err}") from err
    return b"".join([LENGTH.pack(len(text)), text, *blobs])


def decode(body: bytes | bytearray | memoryview) -> Frame:
    """Frame body -> ``(meta, {name: array})``; arrays are writeable copies in native byte order."""
    body = memoryview(body).cast("B")
    if len(body) < LENGTH.size:
        raise WireError(f"frame body of {len(body)} bytes has no header length")
    (size,) = LENGTH.unpack_from(body)
    pos = LENGTH.size + size
    if pos > len(body):
        raise WireError(f"frame header claims {size} bytes but the body has {len(body) - LENGTH.size}")
    try:
        message = json.loads(bytes(body[LENGTH.size : pos]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WireError(f"frame header is not valid UTF-8 JSON: {err}") from err
    if (
        not isinstance(message, dict)
        or not isinstance(message.get("meta"), dict)
        or not isinstance(message.get("arrays"), list)
    ):
        raise WireError("frame header must be {'meta': {...}, 'arrays': [...]}")
    arrays = {}
    for entry in message["arrays"]:
        name, dtype, shape = _entry(entry)
        nbytes = math.prod(shape) * dtype.itemsize
        if pos + nbytes > len(body):
            raise WireError(f"array {name!r} needs {nbytes} bytes but only {len(body) - pos} remain")
        raw = np.frombuffer(body[pos : pos + nbytes], dtype=dtype)
        arrays[name] = raw.reshape(shape).astype(dtype.newbyteorder("="))  # a writeable copy in native order
        pos += nbytes
    if pos != len(body):
        raise WireError(f"frame has {len(body) - pos} trailing bytes after its arrays")
    return message["meta"], arrays


def _entry(entry: Any) -> tuple[str, np.dtype, list[int]]:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise WireError(f"frame array entry must be {{'name', 'dtype', 'shape'}}, got {entry!r}")
    name = entry["name"]
    try:
        dtype = np.dtype(entry.get("dtype"))
    except TypeError as err:
        raise WireError(f"array {name!r} has an unknown dtype {entry.get('dtype')!r}") from err
    if dtype.kind not in KINDS:
        raise WireError(f"array {name!r} has dtype {dtype}; only bool, int, uint and float dtypes")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise WireError(f"array {name!r} has a bad shape {shape!r}; expected a list of ints >= 0")
    return name, dtype, shape


def frame_bytes(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> bytes:
    """One complete frame (length prefix + body), ready for ``write``."""
    body = encode(meta, arrays)
    if len(body) > MAX_FRAME_BYTES:
        raise WireError(f"frame of {len(body)} bytes exceeds MAX_FRAME_BYTES={MAX_FRAME_BYTES}")
    return LENGTH.pack(len(body)) + body


def write_frame(stream: Any, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> None:
    """Write one frame to a binary stream (then flush) or a socket (``sendall``)."""
    data = frame_bytes(meta, arrays)
    if hasattr(stream, "sendall"):
        stream.sendall(data)
    else:
        stream.write(data)
        stream.flush()


def read_frame(stream: Any) -> Frame:
    """Read one frame from a blocking binary stream or socket; ``EOFError`` at a clean end between frames."""
    (size,) = LENGTH.unpack(_read_exact(stream, LENGTH.size, at_boundary=True))
    if size > MAX_FRAME_BYTES:
        raise WireError(f"frame length {size} exceeds MAX_FRAME_BYTES={MAX_FRAME_BYTES}: stream out of sync")
    return decode(_read_exact(stream, size, at_boundary=False))


def _read_exact(stream: Any, n: int, at_boundary: bool) -> bytearray:
    buffer = bytearray(n)
    view, got = memoryview(buffer), 0
    while got < n:
        count = stream.recv_into(view[got:]) if hasattr(stream, "recv_into") else stream.readinto(view[got:])
        if not count:
            if got == 0 and at_boundary:
                raise EOFError("stream closed")
            raise WireError(f"stream closed inside a frame ({got} of {n} bytes read)")
        got += count
    return buffer


class FrameReader:
    """Incremental frame reader on a non-blocking file descriptor: ``read_available()`` returns every complete frame
    that has arrived and never blocks; ``eof`` turns True once the writer has closed its end."""

    def __init__(self, fd: int, chunk_bytes: int = 1 << 16) -> None:
        self.fd = fd
        self.chunk_bytes = chunk_bytes
        self.eof = False
        self._buffer = bytearray()

    def read_available(self) -> list[Frame]:
        while not self.eof:
            try:
                data = os.read(self.fd, self.chunk_bytes)
            except BlockingIOError:
                break
            if not data:
                self.eof = True
            self._buffer += data
        frames = []
        while len(self._buffer) >= LENGTH.size:
            (size,) = LENGTH.unpack_from(self._buffer)
            if size > MAX_FRAME_BYTES:
                raise WireError(f"frame length {size} exceeds MAX_FRAME_BYTES={MAX_FRAME_BYTES}: stream out of sync")
            end = LENGTH.size + size
            if len(self._buffer) < end:
                break
            frames.append(decode(bytes(self._buffer[LENGTH.size : end])))
            del self._buffer[:end]
        return frames
