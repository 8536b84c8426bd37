"""Weight lookup: local files, explicit paths, hub downloads, one clear error for all missing."""

from __future__ import annotations

import logging
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants, errors

from lineareval.models import weights
from lineareval.models.weights import MissingWeightsError, WeightFile, resolve_weight_files

REPO = "FoundationVision/LlamaGen"


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once at import; keep its own flag in step.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def online(monkeypatch):
    """Pretend to be online; tests using this replace hf_hub_download, so nothing is fetched."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def no_download(monkeypatch):
    """Fail loudly if the code tries to reach the hub."""

    def refuse(**kwargs):
        raise AssertionError(f"hf_hub_download must not be called: {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


def test_local_file_is_found(tmp_path, offline, no_download, caplog):
    (tmp_path / "c2i_XL_384.pt").write_bytes(b"weights")
    (tmp_path / "vq").mkdir()
    (tmp_path / "vq" / "vq_ds16_c2i.pt").write_bytes(b"vq")
    files = [WeightFile("c2i_XL_384.pt", REPO), WeightFile("vq/vq_ds16_c2i.pt", REPO)]

    with caplog.at_level(logging.INFO, logger=weights.__name__):
        paths = resolve_weight_files(files, tmp_path)

    assert paths == [tmp_path / "c2i_XL_384.pt", tmp_path / "vq" / "vq_ds16_c2i.pt"]
    assert paths[0].read_bytes() == b"weights"
    assert f"Found c2i_XL_384.pt in {tmp_path}" in caplog.text


def test_explicit_path_overrides_lookup(tmp_path, offline, no_download):
    explicit = tmp_path / "elsewhere" / "my_xl.pt"
    explicit.parent.mkdir()
    explicit.write_bytes(b"mine")
    (tmp_path / "c2i_XL_384.pt").write_bytes(b"default")

    paths = resolve_weight_files([WeightFile("c2i_XL_384.pt", REPO, path=str(explicit))], tmp_path)
    assert paths == [explicit]


def test_missing_explicit_path_is_named(tmp_path, offline, no_download):
    explicit = tmp_path / "nowhere.pt"
    (tmp_path / "c2i_XL_384.pt").write_bytes(b"the default must not be used instead")
    file = WeightFile("c2i_XL_384.pt", REPO, path=str(explicit), field="model.ckpt")

    with pytest.raises(MissingWeightsError) as info:
        resolve_weight_files([file], tmp_path)
    message = str(info.value)
    assert f"{explicit}: explicit path does not exist" in message
    assert "set model.ckpt=PATH" in message
    assert "weights=random" in message


def test_all_missing_files_in_one_offline_error(tmp_path, offline, no_download):
    folder = tmp_path / "weights"
    files = [WeightFile("c2i_XL_384.pt", REPO), WeightFile("vq_ds16_c2i.pt", REPO)]

    with pytest.raises(MissingWeightsError) as info:
        resolve_weight_files(files, folder)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "Missing model weights (2 files)" in message
    for name in ("c2i_XL_384.pt", "vq_ds16_c2i.pt"):
        reason = f"- {name}: not found in {folder.absolute()} (offline: HF_HUB_OFFLINE is set)"
        assert reason in message
        assert f"hf download {REPO} {name} --local-dir {folder.absolute()}" in message
    assert f"https://huggingface.co/{REPO}" in message
    last_line = message.splitlines()[-1]
    assert last_line.startswith("Random weights are only used when asked for explicitly")


def test_missing_without_repo_or_download(tmp_path, online, no_download):
    files = [WeightFile("private.pt", None, field="model.ckpt"), WeightFile("c2i_B_256.pt", REPO)]
    with pytest.raises(MissingWeightsError) as info:
        resolve_weight_files(files, tmp_path, download=False)
    message = str(info.value)
    assert "private.pt: not found" in message and "no hub repository is known" in message
    assert "set model.ckpt=PATH" in message
    assert "c2i_B_256.pt: not found" in message and "download is disabled" in message
    assert "huggingface.co" not in message.split("c2i_B_256.pt")[0]  # no URL for the repo-less file


def test_download_writes_into_weights_dir(tmp_path, online, monkeypatch, caplog):
    calls = []

    def fake_download(*, repo_id, filename, local_dir):
        calls.append((repo_id, filename, Path(local_dir)))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"downloaded")
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    (tmp_path / "vq_ds16_c2i.pt").write_bytes(b"local")
    files = [WeightFile("vq_ds16_c2i.pt", REPO), WeightFile("c2i_XL_384.pt", REPO)]

    with caplog.at_level(logging.INFO, logger=weights.__name__):
        paths = resolve_weight_files(files, tmp_path)

    assert calls == [(REPO, "c2i_XL_384.pt", tmp_path)]
    assert paths == [tmp_path / "vq_ds16_c2i.pt", tmp_path / "c2i_XL_384.pt"]
    assert paths[1].read_bytes() == b"downloaded"
    assert "Downloaded c2i_XL_384.pt" in caplog.text


@pytest.mark.parametrize(
    "failure",
    [
        errors.LocalEntryNotFoundError("cannot find the requested files in the local cache"),
        errors.OfflineModeIsEnabled("offline mode is enabled"),
        ConnectionError("Name or service not known"),
        errors.EntryNotFoundError("404 entry not found"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_download_failures_become_one_clear_error(tmp_path, online, monkeypatch, failure):
    def failing_download(**kwargs):
        raise failure

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing_download)
    with pytest.raises(MissingWeightsError) as info:
        resolve_weight_files([WeightFile("c2i_XL_384.pt", REPO)], tmp_path)
    message = str(info.value)
    assert f"download failed: {type(failure).__name__}: {failure}" in message
    assert f"hf download {REPO} c2i_XL_384.pt --local-dir {tmp_path}" in message


def test_real_hub_client_offline_error_is_translated(tmp_path, monkeypatch):
    """The installed huggingface_hub's own offline failure lands in our error, not its own."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the real client makes no request
    monkeypatch.setattr(weights, "_hub_offline", lambda: False)  # so that we do call it
    with pytest.raises(MissingWeightsError) as info:
        resolve_weight_files([WeightFile("c2i_XL_384.pt", REPO)], tmp_path)
    assert "download failed: LocalEntryNotFoundError" in str(info.value)
    assert not (tmp_path / "c2i_XL_384.pt").exists()


def test_explicit_path_to_a_directory_is_not_called_missing(tmp_path, offline, no_download):
    folder = tmp_path / "c2i_XL_384.pt"
    folder.mkdir()
    (folder / "c2i_XL_384.pt").write_bytes(b"weights")
    file = WeightFile("c2i_XL_384.pt", REPO, path=str(folder), field="model.gpt_ckpt")
    with pytest.raises(MissingWeightsError) as info:
        resolve_weight_files([file], tmp_path / "weights")
    message = str(info.value)
    assert f"{folder}: is a directory, not a file" in message and "does not exist" not in message
    assert str(folder / "c2i_XL_384.pt") in message  # the file inside, to point model.gpt_ckpt at


def test_directory_in_weights_dir_is_named(tmp_path, offline, no_download):
    (tmp_path / "c2i_XL_384.pt").mkdir()
    with pytest.raises(MissingWeightsError) as info:
        resolve_weight_files([WeightFile("c2i_XL_384.pt", REPO)], tmp_path)
    assert f"{tmp_path / 'c2i_XL_384.pt'} is a directory, not a file" in str(info.value)
