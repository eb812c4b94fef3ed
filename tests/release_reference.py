"""A plain, one-video-at-a-time reference of the DnS networks, written from their documented
behaviour (docs/architecture.md and the DnS paper/release description) directly on state_dict
tensors, without the project's modules. The parity tests compare the networks against it.

It also builds random state_dicts with the release's keys and shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# -- random state_dicts with the release's keys and shapes ------------------------------------


def _rand(gen: torch.Generator, *shape: int, scale: float | None = None) -> Tensor:
    fan_in = shape[-1] if len(shape) > 1 else shape[0]
    if len(shape) == 4:
        fan_in = shape[1] * shape[2] * shape[3]
    std = scale if scale is not None else 1.0 / math.sqrt(fan_in)
    return torch.randn(*shape, generator=gen) * std


def _attention_sd(gen: torch.Generator, dims: int) -> dict[str, Tensor]:
    return {
        "attention.transform.weight": _rand(gen, dims, dims),
        "attention.transform.bias": _rand(gen, dims, scale=0.1),
        "attention.context_vector.weight": _rand(gen, 1, dims, scale=1.0),
    }


def _comparator_sd(gen: torch.Generator) -> dict[str, Tensor]:
    sd = {}
    for name, (cout, cin, k) in {
        "conv1": (32, 1, 3),
        "conv2": (64, 32, 3),
        "conv3": (128, 64, 3),
        "fconv": (1, 128, 1),
    }.items():
        sd[f"visil_head.{name}.weight"] = _rand(gen, cout, cin, k, k)
        sd[f"visil_head.{name}.bias"] = _rand(gen, cout, scale=0.05)
    return sd


def _layer_norm_sd(gen: torch.Generator, prefix: str, dims: int) -> dict[str, Tensor]:
    return {
        f"{prefix}.weight": 1.0 + _rand(gen, dims, scale=0.1),
        f"{prefix}.bias": _rand(gen, dims, scale=0.1),
    }


def random_state_dict(
    kind: str,
    *,
    dims: int = 512,
    bits: int = 512,
    hidden_size: int = 100,
    num_layers: int = 1,
    clusters: int = 64,
    outdims: int = 1024,
    feedforward: int = 2048,
    transformer_layers: int = 1,
    seed: int = 0,
) -> dict[str, Tensor]:
    """A random state_dict of a network of ``kind`` with the documented keys and shapes."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "cg_student":
        sd = _attention_sd(gen, dims)
        for i in range(transformer_layers):
            p = f"transformer.layers.{i}"
            sd |= {
                f"{p}.self_attn.in_proj_weight": _rand(gen, 3 * dims, dims),
                f"{p}.self_attn.in_proj_bias": _rand(gen, 3 * dims, scale=0.1),
                f"{p}.self_attn.out_proj.weight": _rand(gen, dims, dims),
                f"{p}.self_attn.out_proj.bias": _rand(gen, dims, scale=0.1),
                f"{p}.linear1.weight": _rand(gen, feedforward, dims),
                f"{p}.linear1.bias": _rand(gen, feedforward, scale=0.1),
                f"{p}.linear2.weight": _rand(gen, dims, feedforward),
                f"{p}.linear2.bias": _rand(gen, dims, scale=0.1),
            }
            sd |= _layer_norm_sd(gen, f"{p}.norm1", dims) | _layer_norm_sd(gen, f"{p}.norm2", dims)
        sd |= _layer_norm_sd(gen, "transformer.norm", dims)
        sd |= {
            "netvlad.centroids": _rand(gen, clusters, dims),
            "netvlad.conv.weight": _rand(gen, clusters, dims, 1, 1, scale=0.5),
            "netvlad.reduction_layer.weight": _rand(gen, outdims, clusters * dims),
        }
        return sd | _layer_norm_sd(gen, "netvlad.norm", outdims)
    if kind == "fg_att_student":
        return _attention_sd(gen, dims) | _comparator_sd(gen)
    if kind == "fg_bin_student":
        return {"binarization.W": _rand(gen, dims, bits)} | _comparator_sd(gen)
    if kind == "teacher":
        u = torch.randn(1, dims, generator=gen)
        return {"attention.context_vector.weight": u / u.norm()} | _comparator_sd(gen)
    if kind == "selector":
        sd = _attention_sd(gen, dims) | _comparator_sd(gen)
        widths = [3] + [hidden_size] * num_layers
        index = 0
        for fan_in in widths:
            sd[f"mlp.model.{index}.weight"] = _rand(gen, hidden_size, fan_in, scale=1.0)
            bn = f"mlp.model.{index + 1}"
            sd[f"{bn}.weight"] = 1.0 + _rand(gen, hidden_size, scale=0.1)
            sd[f"{bn}.bias"] = _rand(gen, hidden_size, scale=0.1)
            sd[f"{bn}.running_mean"] = _rand(gen, hidden_size, scale=0.1)
            sd[f"{bn}.running_var"] = 0.5 + torch.rand(hidden_size, generator=gen)
            sd[f"{bn}.num_batches_tracked"] = torch.tensor(100)
            index += 4
        sd[f"mlp.model.{index}.weight"] = _rand(gen, 1, hidden_size)
        sd[f"mlp.model.{index}.bias"] = _rand(gen, 1, scale=0.1)
        return sd
    raise ValueError(kind)


# -- building blocks, one video at a time -----------------------------------------------------


def h_attention(sd: dict[str, Tensor], x: Tensor) -> Tensor:
    hidden = torch.tanh(x @ sd["attention.transform.weight"].T + sd["attention.transform.bias"])
    return x * torch.sigmoid(hidden @ sd["attention.context_vector.weight"].T)


def l2_attention(sd: dict[str, Tensor], x: Tensor) -> Tensor:
    u = sd["attention.context_vector.weight"]
    return x * ((x @ (u / u.norm()).T) / 2 + 0.5)


def layer_norm(sd: dict[str, Tensor], prefix: str, x: Tensor) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * sd[f"{prefix}.weight"] + sd[f"{prefix}.bias"]


def encoder_layer(sd: dict[str, Tensor], prefix: str, x: Tensor, heads: int) -> Tensor:
    """Post-norm transformer encoder layer (ReLU feed-forward) on x [T, D]."""
    d = x.shape[1]
    qkv = x @ sd[f"{prefix}.self_attn.in_proj_weight"].T + sd[f"{prefix}.self_attn.in_proj_bias"]
    q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
    hd = d // heads
    outputs = []
    for h in range(heads):
        qh, kh, vh = q[:, h * hd : (h + 1) * hd], k[:, h * hd : (h + 1) * hd], v[:, h * hd : (h + 1) * hd]
        weights = torch.softmax(qh @ kh.T / math.sqrt(hd), dim=-1)
        outputs.append(weights @ vh)
    attended = torch.cat(outputs, dim=1) @ sd[f"{prefix}.self_attn.out_proj.weight"].T
    attended = attended + sd[f"{prefix}.self_attn.out_proj.bias"]
    x = layer_norm(sd, f"{prefix}.norm1", x + attended)
    ff = torch.relu(x @ sd[f"{prefix}.linear1.weight"].T + sd[f"{prefix}.linear1.bias"])
    ff = ff @ sd[f"{prefix}.linear2.weight"].T + sd[f"{prefix}.linear2.bias"]
    return layer_norm(sd, f"{prefix}.norm2", x + ff)


def netvlad(sd: dict[str, Tensor], x: Tensor) -> Tensor:
    """NetVLAD of frame vectors x [T, D], one cluster at a time."""
    centroids = sd["netvlad.centroids"]
    assign_weights = sd["netvlad.conv.weight"][:, :, 0, 0]
    soft = torch.softmax(x @ assign_weights.T, dim=1)  # [T, K]
    clusters = []
    for k in range(centroids.shape[0]):
        residual = (x - centroids[k]) * soft[:, k : k + 1]
        clusters.append(F.normalize(residual.sum(0), dim=0))
    vlad = F.normalize(torch.cat(clusters), dim=0)
    vlad = vlad @ sd["netvlad.reduction_layer.weight"].T
    return layer_norm(sd, "netvlad.norm", vlad)


def cg_index(sd: dict[str, Tensor], x: Tensor, heads: int = 8) -> Tensor:
    """Coarse-grained student on one video [T, R, D] -> [outdims]."""
    x = F.normalize(h_attention(sd, x).sum(1), dim=-1)
    index = 0
    while f"transformer.layers.{index}.linear1.weight" in sd:
        x = encoder_layer(sd, f"transformer.layers.{index}", x, heads)
        index += 1
    x = layer_norm(sd, "transformer.norm", x)
    return F.normalize(netvlad(sd, x), dim=0)


def repeat_short(x: Tensor, axis: int) -> Tensor:
    """The documented rule: a time axis with fewer than 4 frames has each frame repeated
    ceil(4 / length) times."""
    n = x.shape[axis]
    return x.repeat_interleave(math.ceil(4 / n), dim=axis) if n < 4 else x


def comparator(sd: dict[str, Tensor], sim: Tensor) -> Tensor:
    """Video comparator on one frame-to-frame matrix [Tq, Tt] (both >= 4)."""

    def conv(name: str, x: Tensor, pad: int) -> Tensor:
        return F.conv2d(F.pad(x, [pad] * 4), sd[f"visil_head.{name}.weight"], sd[f"visil_head.{name}.bias"])

    x = sim[None, None]
    x = F.max_pool2d(torch.relu(conv("conv1", x, 1)), 2)
    x = F.max_pool2d(torch.relu(conv("conv2", x, 1)), 2)
    x = torch.relu(conv("conv3", x, 1))
    return conv("fconv", x, 0)[0, 0]


def fg_index(sd: dict[str, Tensor], kind: str, x: Tensor) -> Tensor:
    """Fine-grained student indexing of one video [T, R, D] (evaluation mode)."""
    if kind == "fg_bin_student":
        projected = F.normalize(x, dim=-1) @ sd["binarization.W"]
        return torch.where(projected >= 0, 1.0, -1.0)  # documented: a 0 projection gives +1
    if kind == "fg_att_student":
        return h_attention(sd, x)
    if kind == "teacher":
        return l2_attention(sd, x)
    return x


def frame_to_frame(query: Tensor, target: Tensor, scale: float = 1.0) -> Tensor:
    """[Tq, R, C] x [Tt, R, C] -> [Tq, Tt]: max over target regions, mean over query regions."""
    rows = []
    for frame in query:  # [R, C]: its regions against every target region
        scores = (frame @ target.reshape(-1, target.shape[-1]).T).view(frame.shape[0], target.shape[0], -1)
        rows.append(scores.max(dim=2).values.mean(dim=0))
    return torch.stack(rows) * scale


def fg_similarity(sd: dict[str, Tensor], kind: str, query: Tensor, target: Tensor) -> Tensor:
    """Similarity of two indexed videos, a scalar."""
    scale = 1.0 / sd["binarization.W"].shape[1] if kind == "fg_bin_student" else 1.0
    sim = frame_to_frame(query, target, scale)
    sim = repeat_short(repeat_short(sim, 0), 1)
    sim = torch.clamp(comparator(sd, sim), -1.0, 1.0)
    return sim.max(dim=1).values.mean()


def selector_self_similarity(sd: dict[str, Tensor], x: Tensor) -> Tensor:
    """Selector self-similarity of one video [T, R, D], a scalar."""
    x = h_attention(sd, x)
    sim = torch.einsum("iok,jpk->ij", x, x) / (x.shape[1] * x.shape[1])
    sim = repeat_short(repeat_short(sim, 0), 1)
    return comparator(sd, sim).mean()


def selector_mlp(sd: dict[str, Tensor], z: Tensor) -> Tensor:
    """Selector decision for inputs z [N, 3] (evaluation mode) -> [N]."""
    index = 0
    while f"mlp.model.{index + 1}.running_mean" in sd:
        z = z @ sd[f"mlp.model.{index}.weight"].T
        bn = f"mlp.model.{index + 1}"
        z = (z - sd[f"{bn}.running_mean"]) / torch.sqrt(sd[f"{bn}.running_var"] + 1e-5)
        z = torch.relu(z * sd[f"{bn}.weight"] + sd[f"{bn}.bias"])
        index += 4
    z = z @ sd[f"mlp.model.{index}.weight"].T + sd[f"mlp.model.{index}.bias"]
    return torch.sigmoid(z)[:, 0]
