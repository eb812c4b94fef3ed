"""The fine-tensor object format: one video's fine-grained tensor in one stored object.

Layout of format version 2 (all integers little-endian), a fixed 48-byte header followed by
the payload::

    offset  size  field
    0       4     magic b"DNSF"
    4       2     format version (u16), currently 2
    6       1     payload kind (u8): 1 = packed_bits, 2 = float16
    7       1     reserved (u8), must be 0
    8       4     T, frames (u32)
    12      4     R, regions per frame (u32)
    16      4     L code bits (packed_bits) or D dimensions (float16) (u32)
    20      8     payload length in bytes (u64)
    28      16    video binding: the first 16 bytes of SHA-256 of the video id (all zero: unbound)
    44      4     CRC-32 of header bytes [0, 44) followed by the payload (u32)
    48      ...   payload: uint8 [T, R, L/8] (packed_bits) or little-endian float16 [T, R, D]

Version 1 objects (written before the binding existed) have the same first 28 bytes, then the
CRC-32 at offset 28 and the payload at offset 32; they are still read, as unbound objects.

Packed bits follow the project's convention: bit i of byte j is code 8*j+i, bit 1 for +1.

Binding: the header names the video the object belongs to, and T is its frame count, so a
reader that knows which video (and how many frames) it expects detects an object copied or
moved under another video's key, which a checksum alone cannot: the swapped object is intact.

Size bound: an object is exactly ``payload + 48`` bytes. At R = 9, L = 512 a frame packs to
576 bytes, so the header adds less than 1% from T >= 9 frames on (48 / (9 * 576) = 0.93%);
videos of 1-8 frames pay the same 48 bytes, at most 8.3% (T = 1). A float16 frame at
R = 9, D = 512 is 9216 bytes: under 1% for every T >= 1.

Checksum: CRC-32 (``zlib.crc32``). It guards against truncation, bit rot and partial writes,
not against tampering (whoever can write the bucket can also write a matching checksum of
any kind), and it runs about 5x faster than BLAKE2b on these objects. Objects are read on the
re-ranking hot path, so the cheaper check wins.

Readers check, in order: length >= header, magic, version, the declared payload length
against the bytes present (truncation), the checksum, then the kind, reserved byte and the
dimensions against the payload length, then the binding (video id, frame count) when the
caller says what it expects. The checksum comes before the header's other fields so that a
flipped bit anywhere reads as what it is, a checksum mismatch.
Readers refuse versions they do not know: a newer writer must bump it when the layout changes.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from dns_milvus.errors import CorruptObjectError, InvalidInputError
from dns_milvus.ids import id_digest

MAGIC = b"DNSF"
FORMAT_VERSION = 2

# The fields every version starts with; version 2 adds the binding before the checksum.
_FIXED = struct.Struct("<4sHBBIIIQ")
_BINDING_SIZE = 16
_UNBOUND = bytes(_BINDING_SIZE)
_CHECKSUM = struct.Struct("<I")
#: Bytes of each readable version's header before its checksum.
_HEADER_BODY_SIZE = {1: _FIXED.size, 2: _FIXED.size + _BINDING_SIZE}
#: Header size of the objects this module writes.
HEADER_SIZE = _HEADER_BODY_SIZE[FORMAT_VERSION] + _CHECKSUM.size
_MIN_HEADER_SIZE = min(_HEADER_BODY_SIZE.values()) + _CHECKSUM.size
assert (HEADER_SIZE, _MIN_HEADER_SIZE) == (48, 32)

_U32_MAX = 2**32 - 1
_FLOAT16_LE = np.dtype("<f2")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class FineKind(str, enum.Enum):
    """What a fine-tensor object holds."""

    #: Binarised codes, packed 8 per byte: uint8 [T, R, L/8].
    PACKED_BITS = "packed_bits"
    #: Real-valued region vectors: float16 [T, R, D].
    FLOAT16 = "float16"

    def __str__(self) -> str:  # messages read "packed_bits", not "FineKind.PACKED_BITS"
        return self.value


# On-disk codes; never reuse a retired number.
_KIND_TO_CODE = {FineKind.PACKED_BITS: 1, FineKind.FLOAT16: 2}
_CODE_TO_KIND = {code: kind for kind, code in _KIND_TO_CODE.items()}


@dataclass(frozen=True)
class FineTensor:
    """A decoded fine-tensor object.

    ``array`` is a read-only view of the bytes it was decoded from (no copy): uint8
    [T, R, L/8] for packed bits, float16 [T, R, D] for float16. ``bits_or_dims`` is L for
    packed bits (8 x the last axis) and D for float16. ``bound`` says whether the header names
    its video (format 2 objects written with a video id).
    """

    kind: FineKind
    bits_or_dims: int
    array: np.ndarray
    n_frames: int
    format_version: int = FORMAT_VERSION
    bound: bool = False

    @property
    def n_regions(self) -> int:
        return int(self.array.shape[1])


def fine_object_size(kind: FineKind | str, n_frames: int, n_regions: int, bits_or_dims: int) -> int:
    """Exact size in bytes of the object holding a tensor of this kind and shape."""
    return HEADER_SIZE + _payload_size(_as_kind(kind), n_frames, n_regions, bits_or_dims)


def encode_fine_tensor(array: np.ndarray, kind: FineKind | str, *, video_id: str | None = None) -> bytes:
    """Serialise one video's fine tensor (see the module docstring for the layout).

    ``packed_bits`` takes uint8 [T, R, L/8]; ``float16`` takes a floating array [T, R, D], cast
    to float16 (values must be finite and within float16 range). ``video_id`` binds the object
    to its video, so that readers can tell it from another video's object; without it the
    object is unbound.
    """
    kind = _as_kind(kind)
    binding = _UNBOUND if video_id is None else _binding(video_id)
    if not isinstance(array, np.ndarray):
        raise InvalidInputError(f"fine tensor must be a numpy array, got {type(array).__name__}")
    expected = "uint8 [T, R, L/8]" if kind is FineKind.PACKED_BITS else "float [T, R, D]"
    if array.ndim != 3 or 0 in array.shape:
        raise InvalidInputError(
            f"{kind.value} fine tensor must be {expected} with every axis >= 1, got shape {array.shape}"
        )
    if any(size > _U32_MAX for size in array.shape):
        raise InvalidInputError(f"fine tensor axes must each be < 2**32, got shape {array.shape}")

    if kind is FineKind.PACKED_BITS:
        if array.dtype != np.uint8:
            raise InvalidInputError(f"packed_bits fine tensor must be {expected}, got dtype {array.dtype}")
        payload_array = array
        bits_or_dims = 8 * array.shape[2]
        if bits_or_dims > _U32_MAX:
            raise InvalidInputError(f"packed_bits code length {bits_or_dims} does not fit in 32 bits")
    else:
        if not np.issubdtype(array.dtype, np.floating):
            raise InvalidInputError(f"float16 fine tensor must be {expected}, got dtype {array.dtype}")
        if not np.isfinite(array).all():
            raise InvalidInputError("float16 fine tensor must hold only finite values (found NaN or Inf)")
        if array.dtype.itemsize > 2 and np.abs(array).max() > _FLOAT16_MAX:
            raise InvalidInputError(f"float16 fine tensor values must lie within +-{_FLOAT16_MAX:g}")
        payload_array = array.astype(_FLOAT16_LE, copy=False)
        bits_or_dims = array.shape[2]

    payload = np.ascontiguousarray(payload_array).tobytes()
    n_frames, n_regions = array.shape[0], array.shape[1]
    header = (
        _FIXED.pack(
            MAGIC, FORMAT_VERSION, _KIND_TO_CODE[kind], 0, n_frames, n_regions, bits_or_dims, len(payload)
        )
        + binding
    )
    checksum = zlib.crc32(payload, zlib.crc32(header))
    return b"".join((header, _CHECKSUM.pack(checksum), payload))


def decode_fine_tensor(
    data: bytes | bytearray | memoryview,
    video_id: str | None = None,
    *,
    key: str | None = None,
    n_frames: int | None = None,
) -> FineTensor:
    """Parse and verify a fine-tensor object without copying its payload.

    Raises ``CorruptObjectError`` naming ``video_id`` / ``key`` (when given) for bad magic,
    an unknown version or kind, truncated or over-long data, inconsistent dimensions and a
    checksum mismatch; and, when the caller says what it expects, for an object bound to
    another video than ``video_id`` or holding another number of frames than ``n_frames``.
    Unbound objects (format 1, or written without a video id) pass the id check.
    """
    view = memoryview(data).cast("B")

    def corrupt(reason: str) -> CorruptObjectError:
        return CorruptObjectError(f"{_describe(video_id, key)} is corrupt: {reason}")

    if len(view) < _MIN_HEADER_SIZE:
        raise corrupt(f"{len(view)} bytes is shorter than the {_MIN_HEADER_SIZE}-byte header")
    magic, version, kind_code, reserved, frames, n_regions, bits_or_dims, payload_len = _FIXED.unpack_from(
        view
    )
    if magic != MAGIC:
        raise corrupt(f"magic is {bytes(magic)!r}, expected {MAGIC!r} (not a fine-tensor object)")
    body_size = _HEADER_BODY_SIZE.get(version)
    if body_size is None:
        known = " and ".join(str(v) for v in sorted(_HEADER_BODY_SIZE))
        raise corrupt(f"format version {version} is not supported (this reader knows versions {known})")
    header_size = body_size + _CHECKSUM.size
    if len(view) < header_size:
        raise corrupt(f"{len(view)} bytes is shorter than the {header_size}-byte header of version {version}")
    actual_len = len(view) - header_size
    if actual_len != payload_len:
        state = "truncated" if actual_len < payload_len else "has trailing bytes"
        raise corrupt(f"{state}: payload is {actual_len} bytes, header declares {payload_len}")
    (stored_checksum,) = _CHECKSUM.unpack_from(view, body_size)
    payload = view[header_size:]
    checksum = zlib.crc32(payload, zlib.crc32(view[:body_size]))
    if checksum != stored_checksum:
        raise corrupt(f"checksum mismatch (stored {stored_checksum:#010x}, computed {checksum:#010x})")
    # The checksum only proves these are the bytes the writer wrote; a buggy or crafted writer
    # can still declare a shape that does not fit, so check the header's meaning too.
    kind = _CODE_TO_KIND.get(kind_code)
    if kind is None:
        raise corrupt(f"payload kind code {kind_code} is unknown (expected one of {sorted(_CODE_TO_KIND)})")
    if reserved != 0:
        raise corrupt(f"reserved header byte is {reserved}, expected 0")
    if frames == 0 or n_regions == 0 or bits_or_dims == 0:
        raise corrupt(f"header shape T={frames}, R={n_regions}, L/D={bits_or_dims} has an empty axis")
    if kind is FineKind.PACKED_BITS and bits_or_dims % 8:
        raise corrupt(f"packed code length L={bits_or_dims} is not a multiple of 8")
    expected_len = _payload_size(kind, frames, n_regions, bits_or_dims)
    if payload_len != expected_len:
        raise corrupt(
            f"header declares a {payload_len}-byte payload but {kind.value} "
            f"[T={frames}, R={n_regions}, {bits_or_dims}] needs {expected_len} bytes"
        )
    # An intact object under the wrong key (copied, swapped) passes every check above.
    binding = bytes(view[_FIXED.size : body_size])
    bound = len(binding) == _BINDING_SIZE and binding != _UNBOUND
    if bound and video_id is not None and binding != _binding(video_id):
        raise corrupt("it belongs to another video (its header names a different video id)")
    if n_frames is not None and frames != n_frames:
        raise corrupt(f"it holds {frames} frames, the video's row says {n_frames}")

    if kind is FineKind.PACKED_BITS:
        array = np.frombuffer(payload, dtype=np.uint8).reshape(frames, n_regions, bits_or_dims // 8)
    else:
        array = np.frombuffer(payload, dtype=_FLOAT16_LE).reshape(frames, n_regions, bits_or_dims)
    # frombuffer over a bytearray/writable memoryview would be writable; a decoded tensor never is.
    array.flags.writeable = False
    return FineTensor(kind, bits_or_dims, array, frames, format_version=version, bound=bound)


def _binding(video_id: str) -> bytes:
    """The header's video binding: a prefix of the same digest the object key is made from."""
    return bytes.fromhex(id_digest(video_id))[:_BINDING_SIZE]


def _as_kind(kind: FineKind | str) -> FineKind:
    try:
        return FineKind(kind)
    except ValueError:
        allowed = ", ".join(repr(k.value) for k in FineKind)
        raise InvalidInputError(f"fine tensor kind must be one of {allowed}, got {kind!r}") from None


def _payload_size(kind: FineKind, n_frames: int, n_regions: int, bits_or_dims: int) -> int:
    if kind is FineKind.PACKED_BITS:
        return n_frames * n_regions * (bits_or_dims // 8)
    return n_frames * n_regions * bits_or_dims * _FLOAT16_LE.itemsize


def _describe(video_id: str | None, key: str | None) -> str:
    parts = []
    if video_id is not None:
        parts.append(f"video {_shorten(video_id)}")
    if key is not None:
        parts.append(f"key {key!r}")
    return "fine-tensor object of " + ", ".join(parts) if parts else "fine-tensor object"


def _shorten(text: str, limit: int = 120) -> str:
    """repr of a user string, cut so a 512-byte id does not flood a message."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 5] + "...'"
