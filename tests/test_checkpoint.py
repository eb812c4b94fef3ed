"""Checkpoint files: the release layout, inferred options, atomic writes and refusals."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch

from dns_milvus.errors import CheckpointError, InvalidInputError
from dns_milvus.models import (
    CoarseGrainedStudent,
    FineGrainedStudent,
    SelectorNetwork,
    TeacherEnsemble,
    ViSiLTeacher,
    load_checkpoint,
    network_kind,
    save_checkpoint,
)
from tests import release_reference as ref

# Small non-default shapes keep the files small and prove the options are read off the shapes.
NETWORKS = {
    "cg_student": lambda: CoarseGrainedStudent(
        dims=64, transformer_heads=4, transformer_feedforward_dims=96, transformer_layers=2,
        netvlad_clusters=8, netvlad_outdims=48,
    ),
    "fg_att_student": lambda: FineGrainedStudent(dims=64, attention=True),
    "fg_bin_student": lambda: FineGrainedStudent(dims=64, binarization=True, bits=128),
    "fg_student": lambda: FineGrainedStudent(dims=40),
    "selector": lambda: SelectorNetwork(dims=64, hidden_size=24, num_layers=2),
    "teacher": lambda: ViSiLTeacher(dims=48),
    "teacher_ensemble": lambda: TeacherEnsemble(members=3, dims=48),
}  # fmt: skip


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", list(NETWORKS))
def test_round_trip_keeps_kind_options_and_weights(tmp_path: Path, kind: str) -> None:
    net = NETWORKS[kind]()
    path = save_checkpoint(
        net, tmp_path / f"{kind}.pth", args={"learning_rate": 1e-4}, global_step=torch.tensor([7.0])
    )
    loaded = load_checkpoint(path, expected=kind)
    assert type(loaded) is type(net) and network_kind(loaded.state_dict()) == kind
    assert loaded.config() == net.config()
    assert _same_weights(loaded, net)
    assert not loaded.training
    raw = torch.load(path, weights_only=False)  # a file written here: inspect its layout
    assert isinstance(raw["args"], argparse.Namespace) and raw["args"].learning_rate == 1e-4
    assert torch.equal(raw["global_step"], torch.tensor([7.0]))
    assert [p.name for p in tmp_path.iterdir()] == [f"{kind}.pth"], "no temporary file is left behind"


def test_release_layout_file_loads_with_default_shapes(tmp_path: Path) -> None:
    """A file as the release writes it: random weights of the documented shapes, its argparse
    arguments, an optimiser state and a step count."""
    sd = ref.random_state_dict("fg_bin_student", seed=3)
    args = argparse.Namespace(
        student_type="fine-grained", attention=False, binarization=True, binary_bits=512,
        dims=512, learning_rate=1e-4, experiment_path="/experiments/fg",
    )  # fmt: skip
    optimizer = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
        "param_groups": [{"lr": 1e-4}],
    }
    path = tmp_path / "dns_fg_bin_student.pth"
    torch.save({"model": sd, "args": args, "optimizer": optimizer, "global_step": torch.zeros(1)}, path)
    net = load_checkpoint(path, expected=FineGrainedStudent)
    assert net.fg_type == "bin" and net.config()["bits"] == 512 and net.dims == 512
    assert torch.equal(net.binarization.W, sd["binarization.W"])
    video = torch.nn.functional.normalize(torch.randn(5, 9, 512), dim=-1)
    with torch.no_grad():
        codes = net.index_video(video)
        expected = ref.fg_similarity(sd, "fg_bin_student", ref.fg_index(sd, "fg_bin_student", video), codes)
        assert abs(float(net.calculate_video_similarity(codes, codes)) - float(expected)) < 1e-5


def test_heads_come_from_args_and_bare_state_dicts_load(tmp_path: Path) -> None:
    net = NETWORKS["cg_student"]()
    save_checkpoint(net, tmp_path / "cg.pth")
    assert load_checkpoint(tmp_path / "cg.pth").transformer.layers[0].self_attn.num_heads == 4
    torch.save(net.state_dict(), tmp_path / "bare.pth")  # no args: the default 8 heads divide 64 too
    bare = load_checkpoint(tmp_path / "bare.pth", expected="cg_student")
    assert bare.transformer.layers[0].self_attn.num_heads == 8 and bare.output_dim == 48
    wrapped = {f"module.{k}": v for k, v in NETWORKS["selector"]().state_dict().items()}
    torch.save(wrapped, tmp_path / "parallel.pth")
    assert load_checkpoint(tmp_path / "parallel.pth").config()["hidden_size"] == 24


def test_map_location_and_float16_weights(tmp_path: Path) -> None:
    net = NETWORKS["teacher"]()
    torch.save({"model": {k: v.half() for k, v in net.state_dict().items()}}, tmp_path / "half.pth")
    loaded = load_checkpoint(tmp_path / "half.pth", map_location=torch.device("cpu"))
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in loaded.parameters())


def test_wrong_kind_is_refused_with_both_kinds_named(tmp_path: Path) -> None:
    path = save_checkpoint(NETWORKS["fg_bin_student"](), tmp_path / "fine.pth")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, expected="cg_student")
    assert str(err.value) == (
        f"expected a coarse-grained student checkpoint, but {path} holds a fine-grained binarization student"
    )
    with pytest.raises(CheckpointError, match="expected a selector network checkpoint"):
        load_checkpoint(path, expected=SelectorNetwork)
    assert load_checkpoint(path, expected=("fg_att_student", "fg_bin_student")).fg_type == "bin"
    with pytest.raises(InvalidInputError, match="network kind"):
        load_checkpoint(path, expected="coarse")


def test_missing_truncated_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pth")
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint(tmp_path)
    path = save_checkpoint(NETWORKS["selector"](), tmp_path / "sel.pth")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(truncated)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(bytes(b ^ 0x5A for b in data[:4096]) + data[4096:])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(corrupt)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(empty)


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_arbitrary_objects_are_refused_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": NETWORKS["teacher"]().state_dict(), "args": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_checkpoint(path)
    assert not marker.exists()


class _Call:
    """Unpickling this would call a function of the os module."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_unsafe_files_are_refused_without_advice_to_load_them_unsafely(tmp_path: Path) -> None:
    torch.save({"model": NETWORKS["selector"]().state_dict(), "extra": _Call()}, tmp_path / "call.pth")
    # a plain pickle naming a builtin, as a hand-made file would
    (tmp_path / "eval.pth").write_bytes(b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01cbuiltins\neval\nq\x02u.")
    for name in ("call.pth", "eval.pth"):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(tmp_path / name)
        message = str(info.value)
        assert "is not a safe checkpoint" in message and "refusing to unpickle" in message, message
        assert "GLOBAL" in message  # what it refused
        for advice in ("weights_only", "safe_globals", "trust", "False"):
            assert advice not in message, message


def test_unknown_layouts_and_contents(tmp_path: Path) -> None:
    cases = {
        "list.pth": ([1, 2, 3], "holds a list"),
        "strings.pth": ({"model": {"a.weight": "text"}}, "not tensors"),
        "unknown.pth": ({"model": {"encoder.weight": torch.zeros(2, 2)}}, "unknown network layout"),
        "notsd.pth": ({"model": torch.zeros(3)}, "expected 'model' to hold a state_dict"),
    }
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / name)
    sd = NETWORKS["fg_att_student"]().state_dict()
    sd["visil_head.conv2.weight"] = torch.zeros(64, 32, 5, 5)
    torch.save({"model": sd}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="fine-grained attention student layout"):
        load_checkpoint(tmp_path / "shape.pth")
    sd = NETWORKS["selector"]().state_dict()
    del sd["mlp.model.5.running_var"]
    torch.save({"model": sd}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="running_var"):
        load_checkpoint(tmp_path / "missing.pth")


def test_save_refuses_what_weights_only_loading_could_not_read(tmp_path: Path) -> None:
    net = NETWORKS["teacher"]()
    with pytest.raises(InvalidInputError, match="'path'"):
        save_checkpoint(net, tmp_path / "x.pth", args={"path": Path("/data")})
    with pytest.raises(InvalidInputError, match="'optimizer'"):
        save_checkpoint(net, tmp_path / "x.pth", optimizer=object())
    assert not any(tmp_path.iterdir())


def test_save_replaces_an_existing_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "net.pth"
    first, second = NETWORKS["teacher"](), NETWORKS["teacher"]()
    save_checkpoint(first, path)
    inode_before = os.stat(path).st_ino
    save_checkpoint(second, path, args=argparse.Namespace(note="second"))
    assert _same_weights(load_checkpoint(path), second)
    assert os.stat(path).st_ino != inode_before, "written to a new file and renamed over the old one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pth"]


# -- selectors with the segment match -------------------------------------------------------------


def _segment_selector() -> SelectorNetwork:
    """A selector of 4 inputs whose batch norms hold non-trivial running statistics."""
    net = SelectorNetwork(dims=64, hidden_size=24, num_layers=2, segments=4)
    gen = torch.Generator().manual_seed(5)
    for module in net.mlp.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
    return net.eval()


def test_segment_selector_round_trip_keeps_its_segments_and_outputs(tmp_path: Path) -> None:
    net = _segment_selector()
    loaded = load_checkpoint(save_checkpoint(net, tmp_path / "selector.pth"), expected="selector")
    assert loaded.segments == 4 and loaded.input_size == 4 and loaded.config() == net.config()
    assert loaded.mlp.model[0].weight.shape == (24, 4)
    assert _same_weights(loaded, net)
    z = torch.rand(7, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(loaded(z), net(z))
        assert not torch.equal(loaded(z), loaded(z * torch.tensor([1.0, 1.0, 1.0, 0.0])))  # it reads z[:, 3]


def test_release_layout_selector_loads_with_three_inputs(tmp_path: Path) -> None:
    release_args = argparse.Namespace(dims=512, hidden_size=100, num_layers=1, learning_rate=1e-4)
    torch.save({"model": ref.random_state_dict("selector", seed=4), "args": release_args}, tmp_path / "s.pth")
    torch.save(NETWORKS["selector"]().state_dict(), tmp_path / "bare.pth")
    for path in (tmp_path / "s.pth", tmp_path / "bare.pth"):
        net = load_checkpoint(path, expected="selector")
        assert net.segments == 0 and net.input_size == 3 and net.config()["segments"] == 0
        assert net(torch.rand(5, 3)).shape == (5,)


def test_four_input_selector_without_segments_in_its_args_is_refused(tmp_path: Path) -> None:
    sd = _segment_selector().state_dict()
    cases = {
        "bare.pth": sd,
        "no-segments.pth": {"model": sd, "args": argparse.Namespace(dims=64, hidden_size=24)},
        "zero-segments.pth": {"model": sd, "args": argparse.Namespace(segments=0)},
    }
    for name, content in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(CheckpointError, match=r"unknown selector layout: .* over 4 with args.segments"):
            load_checkpoint(tmp_path / name)
    wide = NETWORKS["selector"]().state_dict()
    wide["mlp.model.0.weight"] = torch.zeros(24, 5)  # five inputs: no selector has them
    torch.save({"model": wide, "args": argparse.Namespace(segments=4)}, tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match="unknown selector layout"):
        load_checkpoint(tmp_path / "wide.pth")
