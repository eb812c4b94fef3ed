"""Object stores (a local directory and a real SeaweedFS S3 server), keys and the fine-tensor format.

Tests taking ``store`` run on both backends (see tests/fixtures/s3.py).
"""

from __future__ import annotations

import hashlib
import re
import socket
import struct
import threading
import time
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dns_milvus.errors import (
    BackendUnavailableError,
    CorruptObjectError,
    DnSError,
    InvalidInputError,
    NotFoundError,
)
from dns_milvus.store import (
    HEADER_SIZE,
    FineKind,
    LocalStore,
    ObjectInfo,
    ObjectStore,
    S3Store,
    StoreAccessError,
    decode_fine_tensor,
    encode_fine_tensor,
    fine_key,
    fine_key_prefix,
    fine_object_size,
    open_store,
    put_verified,
    validate_key,
)
from dns_milvus.testing.seaweedfs import SeaweedFSServer

FINE_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*/[0-9a-f]{2}/[0-9a-f]{64}\.dnsf")

HOSTILE_IDS = [
    "../../etc/passwd",
    "/absolute/path",
    "C:\\windows\\system32",
    "a/b/../../c",
    'it\'s a "quoted" id; DROP TABLE videos; --',
    "vidéo-日本語-🎬",
    "  padded  ",
    "x" * 500,
]


def _packed(n_frames: int, n_regions: int = 9, n_bits: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n_frames, n_regions, n_bits // 8), dtype=np.uint8)


def _fine_object(n_frames: int = 4, seed: int = 0) -> bytes:
    return encode_fine_tensor(_packed(n_frames, seed=seed), FineKind.PACKED_BITS)


def _unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rendered(exc: BaseException) -> str:
    """The messages a traceback of ``exc`` would print, of it and every chained exception."""
    texts = []
    seen: BaseException | None = exc
    while seen is not None:
        texts += [*traceback.format_exception_only(type(seen), seen), repr(seen), repr(seen.args)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(texts)


# ----------------------------------------------------------------------------- store contract


def test_put_get_exists_delete(store: ObjectStore) -> None:
    key = "coll/ab/object.dnsf"
    assert not store.exists(key)
    store.put(key, b"\x00payload\xff")
    assert store.exists(key)
    assert store.get(key) == b"\x00payload\xff"
    store.delete(key)
    assert not store.exists(key)
    store.delete(key)  # deleting again is not an error
    with pytest.raises(NotFoundError, match=re.escape(key)):
        store.get(key)


def test_put_replaces_and_accepts_bytes_like(store: ObjectStore) -> None:
    store.put("k/v", b"first version")
    store.put("k/v", bytearray(b"second"))
    assert store.get("k/v") == b"second"
    store.put("k/v", memoryview(b"third"))
    assert store.get("k/v") == b"third"
    store.put("k/empty", b"")
    assert store.get("k/empty") == b""
    with pytest.raises(InvalidInputError, match="bytes"):
        store.put("k/v", "text is not bytes")  # type: ignore[arg-type]


def test_iter_keys_filters_by_prefix(store: ObjectStore) -> None:
    keys = ["alpha/aa/1.dnsf", "alpha/ab/2.dnsf", "alpha/ba/3.dnsf", "beta/aa/4.dnsf", "alphabet/x"]
    for key in keys:
        store.put(key, key.encode())
    assert set(store.iter_keys()) == set(keys)
    assert set(store.iter_keys("alpha/")) == {"alpha/aa/1.dnsf", "alpha/ab/2.dnsf", "alpha/ba/3.dnsf"}
    assert set(store.iter_keys("alpha/a")) == {"alpha/aa/1.dnsf", "alpha/ab/2.dnsf"}
    assert set(store.iter_keys("alpha")) == {*keys[:3], "alphabet/x"}
    assert set(store.iter_keys("alpha/aa/1.dnsf")) == {"alpha/aa/1.dnsf"}
    assert list(store.iter_keys("gamma/")) == []
    with pytest.raises(InvalidInputError, match="prefix"):
        store.iter_keys("../")


def test_stat_and_iter_objects_give_size_and_write_time(store: ObjectStore) -> None:
    keys = {"info/aa/1.dnsf": b"one", "info/ab/2.dnsf": b"second", "other/x": b""}
    for key, data in keys.items():
        store.put(key, data)
    listed = {info.key: info for info in store.iter_objects("info/")}
    assert set(listed) == {"info/aa/1.dnsf", "info/ab/2.dnsf"}
    for key, info in listed.items():
        assert info.size == len(keys[key])
        assert abs(info.modified - time.time()) < 3600  # a wall-clock time, not a counter
        assert store.stat(key) == info
    assert store.stat("info/zz/missing.dnsf") is None
    empty = store.stat("other/x")
    assert isinstance(empty, ObjectInfo) and (empty.key, empty.size) == ("other/x", 0)
    with pytest.raises(InvalidInputError, match="prefix"):
        store.iter_objects("../")


def test_get_many_returns_bytes_or_error_per_key(store: ObjectStore) -> None:
    present = [f"many/{i:02d}/obj.dnsf" for i in range(40)]
    for key in present:
        store.put(key, key.encode() * 3)
    missing = [f"many/{i:02d}/missing.dnsf" for i in range(10)]
    requested = missing[:5] + present + missing[5:] + present[:3]  # mixed order, duplicates

    for workers in (1, 8, 32):
        results = store.get_many(requested, max_workers=workers)
        assert set(results) == set(present) | set(missing)
        for key in present:
            assert results[key] == key.encode() * 3
        for key in missing:
            assert isinstance(results[key], NotFoundError)
            assert key in str(results[key])
    assert store.get_many([]) == {}


def test_get_many_rejects_bad_arguments(store: ObjectStore) -> None:
    with pytest.raises(InvalidInputError, match="max_workers"):
        store.get_many(["a/b"], max_workers=0)
    with pytest.raises(InvalidInputError, match="not valid"):
        store.get_many(["a/b", "../escape"])


@pytest.mark.parametrize(
    "bad_key",
    [
        "",
        "../escape",
        "a/../../escape",
        "/absolute/key",
        "a\\b",
        "..\\escape",
        "a//b",
        "a/./b",
        "trailing/",
        ".hidden",
        "a/.tmp",
        "nul\x00byte",
        "new\nline",
        "spa ce",
        "ünïcode",
        "C:/drive",
        "x" * 800,
    ],
)
def test_invalid_keys_are_rejected_everywhere(store: ObjectStore, bad_key: str) -> None:
    for operation in (
        lambda: store.put(bad_key, b"x"),
        lambda: store.get(bad_key),
        lambda: store.exists(bad_key),
        lambda: store.delete(bad_key),
    ):
        with pytest.raises(InvalidInputError, match=r"not valid|limit"):
            operation()
    assert list(store.iter_keys()) == []


def test_hostile_video_ids_map_to_safe_keys_and_round_trip(store: ObjectStore) -> None:
    keys = [fine_key("videos", video_id) for video_id in HOSTILE_IDS]
    assert len(set(keys)) == len(HOSTILE_IDS)
    for video_id, key in zip(HOSTILE_IDS, keys, strict=True):
        assert FINE_KEY_RE.fullmatch(key), key
        assert key.startswith(fine_key_prefix("videos"))
        store.put(key, video_id.encode("utf-8"))
    for video_id, key in zip(HOSTILE_IDS, keys, strict=True):
        assert store.get(key) == video_id.encode("utf-8")
    assert set(store.iter_keys(fine_key_prefix("videos"))) == set(keys)
    if isinstance(store, LocalStore):
        files = {path for path in store.root.rglob("*") if path.is_file()}
        assert all(path.resolve().is_relative_to(store.root.resolve()) for path in files)
        assert len(files) == len(keys)


def test_put_verified_writes_and_reads_back(store: ObjectStore) -> None:
    key = fine_key("coll", "video-1")
    data = _fine_object()
    put_verified(store, key, data)
    assert store.get(key) == data


def test_corrupt_stored_object_names_the_video(store: ObjectStore) -> None:
    video_id = "clip 'seven'"
    key = fine_key("coll", video_id)
    store.put(key, _fine_object(n_frames=6)[:-100])
    with pytest.raises(CorruptObjectError) as caught:
        decode_fine_tensor(store.get(key), video_id, key=key)
    message = str(caught.value)
    assert repr(video_id) in message and key in message and "truncated" in message


# ------------------------------------------------------------------------------------ keys


def test_fine_key_layout_is_deterministic_and_collection_scoped() -> None:
    key = fine_key("my_collection", "video-1")
    assert FINE_KEY_RE.fullmatch(key)
    assert key == fine_key("my_collection", "video-1")
    digest = key.split("/")[2].removesuffix(".dnsf")
    assert key.split("/")[1] == digest[:2]
    assert fine_key("other", "video-1") == key.replace("my_collection/", "other/", 1)
    assert fine_key("my_collection", "video-2") != key
    assert validate_key(key) == key


@pytest.mark.parametrize(
    "collection", ["", "1starts_with_digit", "has-dash", "has/slash", "..", "a" * 256, "ünï", None]
)
def test_fine_key_rejects_bad_collection_names(collection: object) -> None:
    with pytest.raises(InvalidInputError, match="collection name"):
        fine_key(collection, "video")  # type: ignore[arg-type]


@pytest.mark.parametrize("video_id", ["", "   ", "é" * 300, "tab\there", 42])
def test_fine_key_rejects_bad_video_ids(video_id: object) -> None:
    with pytest.raises(InvalidInputError, match="video id"):
        fine_key("coll", video_id)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- format


@pytest.mark.parametrize("n_frames", [1, 5, 6, 60])
def test_packed_bits_round_trip_is_exact_zero_copy_and_read_only(n_frames: int) -> None:
    codes = _packed(n_frames, seed=n_frames)
    data = encode_fine_tensor(codes, "packed_bits")
    assert len(data) == codes.nbytes + HEADER_SIZE == fine_object_size("packed_bits", n_frames, 9, 512)
    decoded = decode_fine_tensor(data, "vid")
    assert decoded.kind is FineKind.PACKED_BITS
    assert (decoded.bits_or_dims, decoded.n_frames, decoded.n_regions) == (512, n_frames, 9)
    assert decoded.array.dtype == np.uint8 and decoded.array.shape == (n_frames, 9, 64)
    np.testing.assert_array_equal(decoded.array, codes)
    assert np.shares_memory(decoded.array, np.frombuffer(data, dtype=np.uint8))
    assert not decoded.array.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        decoded.array[0, 0, 0] = 1


def test_float16_round_trip_from_float32() -> None:
    rng = np.random.default_rng(3)
    features = rng.standard_normal((7, 9, 512)).astype(np.float32)
    data = encode_fine_tensor(features, FineKind.FLOAT16)
    assert len(data) == 7 * 9 * 512 * 2 + HEADER_SIZE
    decoded = decode_fine_tensor(bytearray(data))
    assert decoded.kind is FineKind.FLOAT16 and decoded.bits_or_dims == 512 and decoded.n_frames == 7
    assert decoded.kind == "float16" == str(decoded.kind)  # compares and prints as its plain name
    assert decoded.array.dtype == np.float16 and decoded.array.shape == (7, 9, 512)
    np.testing.assert_array_equal(decoded.array, features.astype(np.float16))
    assert not decoded.array.flags.writeable  # even when decoded from a writable buffer


def test_header_layout_follows_the_documented_format() -> None:
    codes = _packed(3, n_regions=4, n_bits=256)
    data = encode_fine_tensor(codes, "packed_bits", video_id="clip-1")
    magic, version, kind, reserved, t, r, bits, length = struct.unpack_from("<4sHBBIIIQ", data)
    assert (magic, version, kind, reserved, t, r, bits, length) == (b"DNSF", 2, 1, 0, 3, 4, 256, codes.nbytes)
    assert data[28:44] == hashlib.sha256(b"clip-1").digest()[:16]
    (checksum,) = struct.unpack_from("<I", data, 44)
    assert checksum == zlib.crc32(data[48:], zlib.crc32(data[:44]))
    assert data[48:] == codes.tobytes() and HEADER_SIZE == 48
    float_data = encode_fine_tensor(np.ones((2, 3, 8), np.float16), "float16")
    assert struct.unpack_from("<4sHBBIII", float_data)[2:] == (2, 0, 2, 3, 8)
    assert float_data[28:44] == bytes(16)  # written without a video id: unbound
    assert float_data[48:] == np.ones((2, 3, 8), "<f2").tobytes()


def _version_1(codes: np.ndarray) -> bytes:
    """An object as format 1 wrote it: the same first 28 bytes, the CRC-32, then the payload."""
    body = struct.pack("<4sHBBIIIQ", b"DNSF", 1, 1, 0, *codes.shape[:2], 8 * codes.shape[2], codes.nbytes)
    return body + struct.pack("<I", zlib.crc32(codes.tobytes(), zlib.crc32(body))) + codes.tobytes()


def test_version_1_objects_are_still_read_as_unbound() -> None:
    codes = _packed(5, seed=2)
    decoded = decode_fine_tensor(_version_1(codes), "any video", n_frames=5)
    assert (decoded.format_version, decoded.bound) == (1, False)
    np.testing.assert_array_equal(decoded.array, codes)
    with pytest.raises(CorruptObjectError, match="truncated"):
        decode_fine_tensor(_version_1(codes)[:-1])


def test_binding_detects_an_object_of_another_video_or_frame_count() -> None:
    data = encode_fine_tensor(_packed(6), "packed_bits", video_id="clip-1")
    decoded = decode_fine_tensor(data, "clip-1", n_frames=6)
    assert (decoded.format_version, decoded.bound) == (2, True)
    assert decode_fine_tensor(data).n_frames == 6  # a reader that expects nothing checks nothing
    with pytest.raises(CorruptObjectError, match="belongs to another video") as caught:
        decode_fine_tensor(data, "clip-2", key="c/ab/ab.dnsf")
    assert "'clip-2'" in str(caught.value) and "c/ab/ab.dnsf" in str(caught.value)
    with pytest.raises(CorruptObjectError, match="holds 6 frames, the video's row says 7"):
        decode_fine_tensor(data, "clip-1", n_frames=7)
    unbound = encode_fine_tensor(_packed(6), "packed_bits")
    assert not decode_fine_tensor(unbound, "clip-2").bound


def test_header_overhead_is_below_one_percent_from_nine_frames() -> None:
    for n_frames in range(1, 200):
        payload = n_frames * 9 * 64
        overhead = (fine_object_size("packed_bits", n_frames, 9, 512) - payload) / payload
        assert (overhead < 0.01) == (n_frames >= 9), n_frames
        assert fine_object_size("float16", n_frames, 9, 512) <= n_frames * 9 * 512 * 2 * 1.01


@pytest.mark.parametrize(
    ("array", "kind", "expected"),
    [
        (np.zeros((4, 9, 64), np.int8), "packed_bits", "uint8"),
        (np.zeros((4, 9 * 64), np.uint8), "packed_bits", r"\[T, R, L/8\]"),
        (np.zeros((0, 9, 64), np.uint8), "packed_bits", "every axis"),
        (np.zeros((4, 9, 512), np.int32), "float16", "float"),
        (np.full((2, 9, 512), np.nan, np.float32), "float16", "finite"),
        (np.full((2, 9, 512), 1e6, np.float32), "float16", "within"),
        (np.zeros((4, 9, 64), np.uint8), "int4", "kind must be one of"),
        ([[[0]]], "packed_bits", "numpy array"),
    ],
)
def test_encode_rejects_bad_tensors(array: object, kind: str, expected: str) -> None:
    with pytest.raises(InvalidInputError, match=expected):
        encode_fine_tensor(array, kind)  # type: ignore[arg-type]


def _with_checksum(data: bytearray) -> bytes:
    """Recompute the checksum so that only the field under test is wrong."""
    struct.pack_into("<I", data, 44, zlib.crc32(data[48:], zlib.crc32(data[:44])))
    return bytes(data)


def _patched(offset: int, fmt: str, value: int) -> Callable[[bytes], bytes]:
    def patch(data: bytes) -> bytes:
        edited = bytearray(data)
        struct.pack_into(fmt, edited, offset, value)
        return _with_checksum(edited)

    return patch


def _flip(offset: int) -> Callable[[bytes], bytes]:
    def flip(data: bytes) -> bytes:
        edited = bytearray(data)
        edited[offset] ^= 0x10
        return bytes(edited)

    return flip


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (lambda data: b"", "shorter than the 32-byte header"),
        (lambda data: data[:20], "shorter than the 32-byte header"),
        (lambda data: data[:40], "shorter than the 48-byte header of version 2"),
        (lambda data: b"PNG!" + data[4:], "magic"),
        (_patched(4, "<H", 3), "version 3 is not supported"),
        (_patched(6, "<B", 9), "kind code 9"),
        (_patched(7, "<B", 1), "reserved"),
        (_patched(8, "<I", 7), "needs"),  # T no longer matches the payload length
        (_patched(16, "<I", 500), "not a multiple of 8"),
        (_patched(20, "<Q", 6 * 576 + 1), "declares"),
        (lambda data: data[:-1], "truncated"),
        (lambda data: data + b"\x00", "trailing bytes"),
        (_flip(HEADER_SIZE + 100), "checksum mismatch"),
        (_flip(44), "checksum mismatch"),
        (_flip(30), "checksum mismatch"),  # the binding changed, checksum not updated
        (_flip(12), "checksum mismatch"),  # R changed, checksum not updated
        (_patched(30, "<B", 7), "belongs to another video"),  # re-bound, checksum updated
    ],
)
def test_decode_rejects_corrupt_objects_naming_the_video(
    corrupt: Callable[[bytes], bytes], expected: str
) -> None:
    data = corrupt(_fine_object(n_frames=6))
    video_id = "../../etc/passwd"
    with pytest.raises(CorruptObjectError, match=re.escape(expected)) as caught:
        decode_fine_tensor(data, video_id, key="coll/ab/abc.dnsf")
    assert repr(video_id) in str(caught.value) and "coll/ab/abc.dnsf" in str(caught.value)


def test_decode_error_shortens_long_video_ids() -> None:
    with pytest.raises(CorruptObjectError) as caught:
        decode_fine_tensor(b"garbage", "y" * 500)
    assert "yyyy" in str(caught.value) and len(str(caught.value)) < 300


# ------------------------------------------------------------------------------ LocalStore


def test_local_put_is_atomic_for_concurrent_readers(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    versions = [bytes([1]) * 1_000_000, bytes([2]) * 700_000]
    store.put("hot/key", versions[0])
    writing = threading.Event()
    writing.set()
    seen: list[bytes] = []

    def read_continuously() -> None:
        while writing.is_set():
            seen.append(store.get("hot/key"))

    reader = threading.Thread(target=read_continuously)
    reader.start()
    try:
        for i in range(30):
            store.put("hot/key", versions[i % 2])
    finally:
        writing.clear()
        reader.join()
    assert seen, "the reader never ran while the writer was writing"
    assert all(data in versions for data in seen), "a reader saw a partially written object"


def test_local_store_leaves_no_temporary_files_and_ignores_stray_ones(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    for i in range(5):
        store.put(f"coll/{i:02d}/k.dnsf", b"data")
    assert all(not path.name.startswith(".") for path in store.root.rglob("*"))
    # A writer that crashed between creating and renaming its temporary file leaves this behind.
    (store.root / "coll" / "00" / ".k.dnsf.0123456789abcdef.tmp").write_bytes(b"half")
    (store.root / "coll" / "00" / "not a key.txt").write_bytes(b"foreign")
    assert sorted(store.iter_keys()) == [f"coll/{i:02d}/k.dnsf" for i in range(5)]
    assert store.get("coll/00/k.dnsf") == b"data"


def test_local_store_root_and_key_conflicts(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    with pytest.raises(InvalidInputError, match="not a directory"):
        LocalStore(not_a_dir)
    store = LocalStore(tmp_path / "nested" / "root")  # created on demand
    store.put("a", b"object")
    with pytest.raises(InvalidInputError, match="conflicts"):
        store.put("a/b", b"below an object")
    store.put("c/d", b"object")
    with pytest.raises(InvalidInputError, match="conflicts"):
        store.put("c", b"over a prefix")
    assert not store.exists("c") and store.get("c/d") == b"object"
    with pytest.raises(NotFoundError):
        store.get("c")
    assert list(store.iter_keys()) == ["a", "c/d"]


def test_put_verified_detects_an_object_that_did_not_land_intact(tmp_path: Path) -> None:
    class BitRotStore(LocalStore):
        """A store whose medium flips a bit on write (fault injection)."""

        def put(self, key: str, data: bytes) -> None:
            damaged = bytearray(data)
            damaged[-1] ^= 1
            super().put(key, bytes(damaged))

    with pytest.raises(CorruptObjectError, match="did not verify"):
        put_verified(BitRotStore(tmp_path), "coll/ab/x.dnsf", _fine_object())


# ---------------------------------------------------------------------------------- S3Store


@pytest.mark.s3
def test_s3_wrong_secret_key_is_refused_clearly(s3_server: SeaweedFSServer, s3_bucket: str) -> None:
    wrong_secret = "wrong-secret-" + "z" * 20
    store = s3_server.open_store(s3_bucket, secret_key=wrong_secret, max_attempts=1)
    errors = []
    for operation in (
        lambda: store.put("a/b", b"x"),
        lambda: store.get("a/b"),
        lambda: store.exists("a/b"),
        lambda: list(store.iter_keys()),
    ):
        with pytest.raises(StoreAccessError, match="refused") as caught:
            operation()
        assert "secret key" in str(caught.value) and s3_bucket in str(caught.value)
        errors.append(caught.value)
    results = store.get_many([f"k/{i}" for i in range(20)], max_workers=4)
    assert all(isinstance(error, StoreAccessError) for error in results.values())
    for error in errors:
        rendered = _rendered(error)
        assert wrong_secret not in rendered and s3_server.secret_key not in rendered
    store.close()


@pytest.mark.s3
def test_s3_unknown_access_key_is_refused(s3_server: SeaweedFSServer, s3_bucket: str) -> None:
    store = s3_server.open_store(s3_bucket, access_key="nobody", secret_key="nothing", max_attempts=1)
    with pytest.raises(StoreAccessError, match="InvalidAccessKeyId"):
        store.get("a/b")


def test_s3_server_down_is_backend_unavailable_naming_the_endpoint() -> None:
    endpoint = f"http://127.0.0.1:{_unused_port()}"
    secret = "down-secret-" + "q" * 20
    store = S3Store(
        "bucket",
        endpoint_url=endpoint,
        access_key="key",
        secret_key=secret,
        connect_timeout=1,
        read_timeout=1,
        max_attempts=1,
    )
    for operation in (
        lambda: store.get("a/b"),
        lambda: store.put("a/b", b"x"),
        lambda: store.exists("a/b"),
        lambda: store.delete("a/b"),
        lambda: list(store.iter_keys("a/")),
    ):
        with pytest.raises(BackendUnavailableError, match=re.escape(endpoint)) as caught:
            operation()
        assert secret not in _rendered(caught.value)
    results = store.get_many([f"k/{i}" for i in range(50)], max_workers=8)
    assert len(results) == 50
    assert all(isinstance(error, BackendUnavailableError) for error in results.values())


@pytest.mark.s3
def test_s3_missing_bucket_is_a_configuration_error_not_a_missing_object(s3_server: SeaweedFSServer) -> None:
    store = s3_server.open_store("no-such-bucket-here", max_attempts=1)
    for operation in (
        lambda: store.get("a/b"),
        lambda: store.exists("a/b"),
        lambda: store.put("a/b", b"x"),
        lambda: store.delete("a/b"),
        lambda: list(store.iter_keys()),
    ):
        with pytest.raises(StoreAccessError, match=r"no-such-bucket-here.*does not exist"):
            operation()


@pytest.mark.s3
def test_s3_create_bucket_is_idempotent(s3_server: SeaweedFSServer) -> None:
    bucket = s3_server.make_bucket("made")
    with s3_server.open_store(bucket, create_bucket=True) as store:  # already there: no error
        store.put("k", b"v")
        assert store.get("k") == b"v"
        assert list(store.iter_keys()) == ["k"]  # a bucket without prefix


@pytest.mark.s3
def test_s3_prefixes_isolate_stores_in_one_bucket(s3_server: SeaweedFSServer, s3_bucket: str) -> None:
    first = s3_server.open_store(s3_bucket, prefix="iso/one")
    second = s3_server.open_store(s3_bucket, prefix="/iso/two/")
    first.put("k/x", b"1")
    second.put("k/x", b"2")
    assert (first.get("k/x"), second.get("k/x")) == (b"1", b"2")
    assert list(first.iter_keys()) == ["k/x"] == list(second.iter_keys())
    whole = s3_server.open_store(s3_bucket, prefix="iso")
    assert set(whole.iter_keys()) == {"one/k/x", "two/k/x"}


@pytest.mark.s3
def test_s3_credentials_from_environment(
    s3_server: SeaweedFSServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key_var, secret_var in (
        ("DNS_S3_ACCESS_KEY", "DNS_S3_SECRET_KEY"),
        ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
    ):
        with monkeypatch.context() as env:
            for var in (
                "DNS_S3_ACCESS_KEY",
                "DNS_S3_SECRET_KEY",
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
            ):
                env.delenv(var, raising=False)
            env.setenv(key_var, s3_server.access_key)
            env.setenv(secret_var, s3_server.secret_key)
            store = S3Store(s3_bucket, prefix="env", endpoint_url=s3_server.endpoint_url)
            store.put("k", key_var.encode())
            assert store.get("k") == key_var.encode()
            assert s3_server.secret_key not in repr(store)
    monkeypatch.setenv("DNS_S3_ACCESS_KEY", "only-the-key")
    monkeypatch.delenv("DNS_S3_SECRET_KEY", raising=False)
    with pytest.raises(InvalidInputError, match="DNS_S3_SECRET_KEY"):
        S3Store(s3_bucket, endpoint_url=s3_server.endpoint_url)
    with pytest.raises(InvalidInputError, match="both"):
        S3Store(s3_bucket, endpoint_url=s3_server.endpoint_url, access_key="k")


@pytest.mark.s3
def test_s3_credentials_never_appear_in_repr_or_errors(s3_server: SeaweedFSServer, s3_bucket: str) -> None:
    store = s3_server.open_store(s3_bucket, prefix="secrets")
    shown = [repr(store), str(store), repr(s3_server)]
    with pytest.raises(NotFoundError) as missing:
        store.get("no/such/key")
    shown.append(_rendered(missing.value))
    results = store.get_many(["no/such/key"])
    shown.append(_rendered(results["no/such/key"]))  # type: ignore[arg-type]
    for text in shown:
        assert s3_server.secret_key not in text
        assert s3_server.access_key not in text


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"bucket": "Upper_Case"}, "bucket name"),
        ({"bucket": "ab"}, "bucket name"),
        ({"bucket": "ok-bucket", "prefix": "../up"}, "prefix"),
        ({"bucket": "ok-bucket", "endpoint_url": "ftp://host:21"}, "http"),
        ({"bucket": "ok-bucket", "endpoint_url": "http://host:notaport"}, "port"),
        ({"bucket": "ok-bucket", "retry_mode": "forever"}, "retry_mode"),
        ({"bucket": "ok-bucket", "max_attempts": 0}, "max_attempts"),
        ({"bucket": "ok-bucket", "connect_timeout": -1}, "connect_timeout"),
        ({"bucket": "ok-bucket", "addressing_style": "sideways"}, "addressing_style"),
    ],
)
def test_s3_rejects_bad_settings(settings: dict[str, object], expected: str) -> None:
    with pytest.raises(InvalidInputError, match=expected):
        S3Store(**settings)  # type: ignore[arg-type]


def test_s3_endpoint_with_user_info_is_rejected_without_echoing_it() -> None:
    with pytest.raises(InvalidInputError, match="user information") as caught:
        S3Store("ok-bucket", endpoint_url="http://admin:hunter2secret@127.0.0.1:9000")
    assert "hunter2secret" not in _rendered(caught.value)


# ------------------------------------------------------------------------------- open_store


def test_open_store_local_forms(tmp_path: Path) -> None:
    plain = open_store(str(tmp_path / "plain"))
    assert isinstance(plain, LocalStore) and plain.root == tmp_path / "plain"
    from_uri = open_store(f"file://{tmp_path}/with%20space?fsync=false")
    assert isinstance(from_uri, LocalStore) and from_uri.root == tmp_path / "with space"
    from_uri.put("k", b"v")
    assert (tmp_path / "with space" / "k").read_bytes() == b"v"
    localhost = open_store(f"file://localhost{tmp_path}/lh", fsync=True)
    assert isinstance(localhost, LocalStore) and localhost.root == tmp_path / "lh"


@pytest.mark.s3
def test_open_store_s3_uri(s3_server: SeaweedFSServer, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/uri/prefix?endpoint_url={s3_server.endpoint_url}&region=us-east-1&max_attempts=2"
    store = open_store(uri, access_key=s3_server.access_key, secret_key=s3_server.secret_key)
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.endpoint_url) == (
        s3_bucket,
        "uri/prefix/",
        s3_server.endpoint_url,
    )
    key = fine_key("coll", "uri video")
    put_verified(store, key, _fine_object())
    direct = s3_server.open_store(s3_bucket)
    assert direct.get(f"uri/prefix/{key}") == _fine_object()


@pytest.mark.parametrize(
    ("uri", "options", "expected"),
    [
        ("", {}, "non-empty"),
        ("gs://bucket/prefix", {}, "unknown object store URI scheme 'gs'"),
        ("s3://", {}, "no bucket"),
        ("s3://bucket?colour=blue", {}, "unknown option 'colour'"),
        ("s3://bucket?max_attempts=many", {}, "not a valid integer"),
        ("s3://bucket?region=a&region=b", {}, "more than once"),
        ("file://otherhost/data", {}, "names host"),
        ("file:///data?fsync=maybe", {}, "boolean"),
        ("/tmp/x", {"colour": "blue"}, "bad options for LocalStore"),
    ],
)
def test_open_store_rejects_bad_uris(uri: str, options: dict[str, object], expected: str) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(expected)):
        open_store(uri, **options)


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/p?secret_key=TopSecretValue1",
        "s3://bucket/p?aws_access_key_id=TopSecretValue1",
        "s3://AKIAKEY:TopSecretValue1@bucket/p",
    ],
)
def test_open_store_refuses_credentials_in_uris_without_echoing_them(uri: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        open_store(uri)
    assert "TopSecretValue1" not in _rendered(caught.value)
    assert isinstance(caught.value, DnSError)
