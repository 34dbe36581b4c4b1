"""The bytes that travel between clients and servers: a msgpack header plus raw tensor buffers.

One message = 4-byte header length | msgpack {"meta": {...}, "tensors": [[name, dtype, shape], ...]}
| the tensors' bytes back to back. Nothing is unpickled; dtypes come from a fixed list and every
size is checked before any tensor is built. bf16 travels as 2 bytes per value. Messages larger
than one RPC allows are cut into chunks (`split`) and joined again on arrival (`join`).
"""

from __future__ import annotations

import math

import msgpack
import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "int64": torch.int64, "int32": torch.int32, "bool": torch.bool, "uint8": torch.uint8,
}
_NAMES = {v: k for k, v in DTYPES.items()}
HEADER_LIMIT = 256 << 10        # a header with LoRA for 80 blocks x 7 projections takes about 60 KiB
MAX_ITEMS = 16384               # per msgpack array or map
MAX_CONTAINERS = 8192           # arrays and maps in a whole header, so that parsing one costs milliseconds at
                                # most (a LoRA header for 80 blocks x 7 projections holds about 2,300)
MAX_ELEMENTS = 1 << 40          # per tensor, counting zero-sized dimensions as 1 (so no stride overflows)
CHUNK_BYTES = 1 << 20  # below hivemind's 2 MiB unary limit, with room for protobuf framing
DEFAULT_MAX_MESSAGE = 256 << 20


class WireError(ValueError):
    """A message that cannot be decoded: the text says what is wrong with it."""


def pack(meta: dict, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    tensors = tensors or {}
    specs, buffers = [], []
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise WireError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        t = t.detach().contiguous().cpu()
        specs.append([name, _NAMES[t.dtype], list(t.shape)])
        buffers.append(t.reshape(-1).view(torch.uint8).numpy())  # a view: join below is the only copy
    header = msgpack.packb({"meta": meta, "tensors": specs}, use_bin_type=True)
    return b"".join([len(header).to_bytes(4, "little"), header, *buffers])


# The first byte of every msgpack array or map is one of these (fixmap, fixarray, array 16/32, map 16/32)
_NOT_CONTAINER_BYTES = bytes(b for b in range(256) if not (0x80 <= b <= 0x9f or 0xdc <= b <= 0xdf))


def containers_bound(data: bytes) -> int:
    """At most how many arrays and maps a message's header holds, counted without parsing it: the bytes that may
    start one (other values may hold such bytes too)."""
    header_len = min(int.from_bytes(data[:4], "little"), HEADER_LIMIT) if len(data) >= 4 else 0  # more: refused
    return len(data[4:4 + header_len].translate(None, _NOT_CONTAINER_BYTES))


def unpack(data: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE) -> tuple[dict, dict[str, torch.Tensor]]:
    """Decode `pack`'s output, validating it; raises WireError naming the problem."""
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < 4:
        raise WireError("message is too short to hold a header")
    header_len = int.from_bytes(data[:4], "little")
    if header_len > min(HEADER_LIMIT, len(data) - 4):
        raise WireError(f"bad header length {header_len}")
    containers = 0

    def counted(container):
        nonlocal containers
        containers += 1
        if containers > MAX_CONTAINERS:
            raise WireError(f"header holds more than {MAX_CONTAINERS} arrays and maps")
        return container

    # containers are counted as they are parsed (a Python call each) only where the header might hold too many
    hooks = dict(list_hook=counted, object_hook=counted) if containers_bound(data) > MAX_CONTAINERS else {}
    try:
        header = msgpack.unpackb(data[4:4 + header_len], raw=False, strict_map_key=True, use_list=True,
                                 max_bin_len=HEADER_LIMIT, max_str_len=HEADER_LIMIT, max_array_len=MAX_ITEMS,
                                 max_map_len=MAX_ITEMS, max_ext_len=0, **hooks)
    except WireError:
        raise
    except Exception as e:
        raise WireError(f"header is not valid msgpack: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("meta"), dict) \
            or not isinstance(header.get("tensors"), list):
        raise WireError("header must be a map with 'meta' (map) and 'tensors' (list)")
    offset, tensors = 4 + header_len, {}
    for spec in header["tensors"]:
        name, dtype, shape = _check_spec(spec)
        if name in tensors:
            raise WireError(f"tensor {name!r} appears twice")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if offset + nbytes > len(data):
            raise WireError(f"tensor {name!r} needs {nbytes} bytes but the message ends first")
        buf = bytearray(memoryview(data)[offset:offset + nbytes])
        tensors[name] = (torch.frombuffer(buf, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)).view(shape)
        offset += nbytes
    if offset != len(data):
        raise WireError(f"{len(data) - offset} unexpected trailing bytes")
    return header["meta"], tensors


def _check_spec(spec) -> tuple[str, torch.dtype, list[int]]:
    if not (isinstance(spec, list) and len(spec) == 3):
        raise WireError(f"bad tensor spec {spec!r:.100}")
    name, dtype, shape = spec
    if not isinstance(name, str) or dtype not in DTYPES:
        raise WireError(f"bad tensor name or dtype in {spec!r:.100}")
    dims_ok = isinstance(shape, list) and len(shape) <= 8 and all(type(d) is int and 0 <= d < 2**31 for d in shape)
    if not dims_ok or math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:  # bools are not sizes
        raise WireError(f"bad shape for tensor {name!r}: {shape!r:.100}")
    return name, DTYPES[dtype], shape


def frames(data: bytes, chunk_bytes: int = CHUNK_BYTES) -> list[bytes]:
    """Cut a message into RPC-sized frames; each starts with 1 if more frames follow, else 0."""
    view = memoryview(data)  # slices of a view: each frame is copied once, by the marker's concatenation
    parts = [view[i:i + chunk_bytes] for i in range(0, len(data), chunk_bytes)] or [b""]
    return [(b"\x01" if i < len(parts) - 1 else b"\x00") + part for i, part in enumerate(parts)]


class Reassembler:
    """Collects frames until a message is whole; bounded by `max_bytes`."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_MESSAGE):
        self.max_bytes = max_bytes
        self._parts: list[bytes] = []
        self._size = 0

    def reset(self) -> None:
        """Drop a partial message (the stream failed): its bytes go now, whatever still references the reader."""
        self._parts, self._size = [], 0

    def add(self, frame: bytes) -> bytes | None:
        """Returns the whole message once its last frame arrives, else None."""
        if not frame or frame[0] not in (0, 1):
            raise WireError("bad frame marker")
        self._size += len(frame) - 1
        if self._size > self.max_bytes:
            raise WireError(f"message exceeds the limit of {self.max_bytes} bytes")
        self._parts.append(frame[1:])
        if frame[0] == 1:
            return None
        data, self._parts, self._size = b"".join(self._parts), [], 0
        return data
