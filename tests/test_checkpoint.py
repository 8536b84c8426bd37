"""Checkpoint loading: official layouts round-trip, foreign pickles refused, mismatches named."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lineareval.models.checkpoint import (
    CheckpointError,
    extract_model_state,
    load_into,
    load_state_dict_file,
)

EXPLOITED = {"flag": False}


def _exploit() -> None:
    EXPLOITED["flag"] = True


class ReduceExploit:
    """Unpickling this calls `_exploit`, as a malicious checkpoint would run arbitrary code."""

    def __reduce__(self):
        return (_exploit, ())


class StateExploit:
    """Unpickling this instantiates the class and runs its `__setstate__`."""

    def __init__(self) -> None:
        self.payload = 1

    def __setstate__(self, state: dict) -> None:
        _exploit()


class TinyGPT(nn.Module):
    """A few modules named like LlamaGen's, enough to exercise key and shape checks."""

    def __init__(self, dim: int = 8, vocab: int = 16) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].attention = nn.Module()
        self.layers[0].attention.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.layers[0].attention.wo = nn.Linear(dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)


def _reference_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {key: value.clone() for key, value in TinyGPT().state_dict().items()}


def _layouts(state):
    return {
        "llamagen": {
            "model": state,
            "steps": 3,
            "args": argparse.Namespace(lr=1e-4, gpt_model="GPT-B"),
        },
        "deepspeed": {"module": state},
        "state_dict": {"state_dict": state},
        "raw_fsdp": state,
        "raw_with_freqs_cis": {**state, "freqs_cis": torch.randn(5, 4, 2)},
    }


@pytest.mark.parametrize("layout", list(_layouts({})))
def test_round_trip_official_layouts(tmp_path, layout):
    reference = _reference_state()
    path = tmp_path / f"{layout}.pt"
    torch.save(_layouts(reference)[layout], path)

    state = load_state_dict_file(path)
    model = TinyGPT()
    load_into(model, state, source=str(path))

    loaded = model.state_dict()
    assert set(loaded) == set(reference)
    for key, value in reference.items():
        assert torch.equal(loaded[key], value), key


def test_round_trip_safetensors(tmp_path):
    reference = _reference_state()
    path = tmp_path / "model.safetensors"
    save_file(reference, path)

    model = TinyGPT()
    load_into(model, load_state_dict_file(path), source=str(path))
    for key, value in reference.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_tensors_keep_stored_dtype(tmp_path):
    reference = {key: value.to(torch.bfloat16) for key, value in _reference_state().items()}
    path = tmp_path / "bf16.pt"
    torch.save({"model": reference}, path)
    state = load_state_dict_file(path)
    assert {value.dtype for value in state.values()} == {torch.bfloat16}
    assert all(torch.equal(state[key], value) for key, value in reference.items())


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize(
    "payload, refused", [(ReduceExploit, "_exploit"), (StateExploit, "StateExploit")]
)
def test_arbitrary_object_is_refused_without_running_it(tmp_path, payload, refused, zipfile):
    path = tmp_path / "evil.pt"
    checkpoint = {"model": _reference_state(), "payload": payload()}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zipfile)

    EXPLOITED["flag"] = False
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(path)
    assert EXPLOITED["flag"] is False
    message = str(info.value)
    assert str(path) in message
    assert "allow-list" in message
    assert f"Unsupported global: GLOBAL {__name__}.{refused}" in message  # torch's own reason
    assert "weights_only=False" not in message

    # The same file does run code under an unrestricted unpickler, so the check above is meaningful.
    torch.load(path, weights_only=False)
    assert EXPLOITED["flag"] is True
    EXPLOITED["flag"] = False


def test_missing_and_unexpected_keys_are_named():
    state = _reference_state()
    del state["output.weight"]
    state["layers.0.attention.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError) as info:
        load_into(TinyGPT(), state, source="ckpt.pt")
    message = str(info.value)
    assert "missing keys (1): output.weight" in message
    assert "unexpected keys (1): layers.0.attention.extra.weight" in message
    assert "ckpt.pt" in message
    assert "model.*" in message


def test_shape_mismatch_is_ours_not_torchs():
    state = _reference_state()
    state["layers.0.attention.wqkv.weight"] = torch.zeros(12, 8)
    model = TinyGPT()
    before = model.state_dict()["tok_embeddings.weight"].clone()
    with pytest.raises(CheckpointError) as info:
        load_into(model, state, source="ckpt.pt")
    message = str(info.value)
    assert (
        "shape mismatches (1): layers.0.attention.wqkv.weight: checkpoint (12, 8) vs model (24, 8)"
        in message
    )
    assert "missing keys" not in message and "unexpected keys" not in message
    # Nothing was loaded before the error.
    assert torch.equal(model.state_dict()["tok_embeddings.weight"], before)


def test_long_key_lists_are_truncated():
    state = _reference_state()
    state.update({f"layers.{i}.attention.wqkv.weight": torch.zeros(1) for i in range(1, 26)})
    with pytest.raises(CheckpointError) as info:
        load_into(TinyGPT(), state, source="ckpt.pt")
    message = str(info.value)
    assert "unexpected keys (25): layers.1.attention.wqkv.weight" in message
    assert "... and 15 more" in message
    assert "layers.25.attention.wqkv.weight" not in message


def test_module_freqs_cis_buffer_is_not_required():
    model = TinyGPT()
    model.register_buffer("freqs_cis", torch.ones(3))
    state = _reference_state()
    load_into(model, state, source="ckpt.pt")
    assert torch.equal(model.freqs_cis, torch.ones(3))
    assert torch.equal(model.output.weight, state["output.weight"])


def test_unknown_layout_names_top_level_keys(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"foo": {"x": 1}, "bar": 1}, path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(path)
    message = str(info.value)
    assert "'foo'" in message and "'bar'" in message
    assert str(path) in message


@pytest.mark.parametrize("obj", [[torch.zeros(1)], {}, {"model": {"a": 1}}])
def test_non_state_dicts_are_rejected(obj):
    with pytest.raises(CheckpointError, match="x.pt"):
        extract_model_state(obj, "x.pt")


# --------------------------------------------------------------------- files that are not checkpoints


def test_empty_file_names_the_file_and_says_it_is_empty(tmp_path):
    path = tmp_path / "c2i_XL_384.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(path)
    message = str(info.value)
    assert str(path) in message and "empty (0 bytes)" in message
    assert "download" in message  # the fix: fetch it again


def test_random_bytes_name_the_file_and_the_real_problem(tmp_path):
    path = tmp_path / "c2i_XL_384.pt"
    path.write_bytes(bytes(range(7, 256)) * 4)  # no zip, pickle or safetensors header
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(path)
    message = str(info.value)
    assert str(path) in message
    assert "allow-list" not in message  # nothing was refused: the file is not a checkpoint at all
    assert "not a torch checkpoint" in message and "safetensors" in message
    assert r"b'\x07\x08\t\n" in message  # what it starts with instead


def test_corrupt_pickle_reports_torchs_full_reason(tmp_path):
    """A legacy torch pickle header followed by garbage: torch's own reason is on a later line of its message."""
    path = tmp_path / "c2i_XL_384.pt"
    path.write_bytes(b"\x80\x02" + bytes([207]) * 64)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(path)
    message = str(info.value)
    assert str(path) in message and "allow-list" not in message
    assert "Unsupported operand 207" in message  # torch's reason, not only its header line


def test_truncated_zip_checkpoint_names_the_file(tmp_path):
    full = tmp_path / "full.pt"
    torch.save({"model": _reference_state()}, full)
    path = tmp_path / "c2i_XL_384.pt"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(path)
    message = str(info.value)
    assert str(path) in message and "truncated or corrupt" in message


def test_directory_is_not_reported_as_missing(tmp_path):
    folder = tmp_path / "c2i_XL_384.pt"
    folder.mkdir()
    torch.save({"model": _reference_state()}, folder / "model.pt")
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(folder)
    message = str(info.value)
    assert str(folder) in message and "is a directory" in message
    assert "does not exist" not in message and "model.pt" in message  # the file inside it, to point at


def test_git_lfs_pointer_is_recognised(tmp_path):
    path = tmp_path / "c2i_XL_384.pt"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(CheckpointError, match="Git LFS pointer.*git lfs pull"):
        load_state_dict_file(path)


def test_safetensors_content_under_another_name_loads(tmp_path):
    reference = _reference_state()
    path = tmp_path / "renamed.pt"
    save_file(reference, path)
    state = load_state_dict_file(path)
    assert set(state) == set(reference) and all(torch.equal(state[k], v) for k, v in reference.items())


class _SystemCall:
    """A pickle that calls os.system when unpickled (torch blocks the module: 'posix is blocked')."""

    def __reduce__(self):
        import os

        return (os.system, ("echo this-should-never-run",))


def test_a_pickle_that_would_run_code_is_called_so_not_corrupt(tmp_path):
    path = tmp_path / "code.pt"
    torch.save({"model": _reference_state(), "payload": _SystemCall()}, path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_file(path)
    message = str(info.value)
    assert str(path) in message and "holds code" in message and "system" in message
    assert "python -m lineareval.models.convert" in message
    assert "truncated" not in message and "Download it again" not in message
    assert "weights_only" not in message  # torch's advice to load it unsafely is not passed on
