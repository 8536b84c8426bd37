"""Tests for Chameleon's VQGAN and image vocabulary: yaml + Lightning checkpoint loading, raster-order
decoding, uint8 conversion, BPE <-> code maps and Lumina's size tokens.

(Decoder parity with the official Chameleon/Lumina code was checked once against their sources, max
difference 0.0; their code is not imported here, so the suite needs no checkout of theirs.)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lineareval.models.checkpoint import CheckpointError
from lineareval.models.chameleon_vqgan import (
    ChameleonVQGAN,
    ChameleonVQGANConfig,
    ImageVocabulary,
    code_from_name,
    find_vqgan_weights,
    load_chameleon_vqgan,
    to_uint8,
)

# Attention at the lowest resolution (side 8 of resolution 16), like taming's usual attn_resolutions [16].
TINY = ChameleonVQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=8,
                            resolution=16, n_embed=16, embed_dim=4)
DDCONFIG_FIELDS = ("double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                   "num_res_blocks", "attn_resolutions", "dropout")



def _randomised(config: ChameleonVQGANConfig = TINY, seed: int = 0) -> ChameleonVQGAN:
    """Every parameter (norm affines included) random, so no layer is an identity."""
    torch.manual_seed(seed)
    model = ChameleonVQGAN(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


def _yaml_document(config: ChameleonVQGANConfig) -> dict:
    """A vqgan.yaml in the official layout, loss config included (the official loader deletes it)."""
    ddconfig = {name: getattr(config, name) for name in DDCONFIG_FIELDS}
    ddconfig["ch_mult"], ddconfig["attn_resolutions"] = list(config.ch_mult), list(config.attn_resolutions)
    return {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel",
                      "params": {"embed_dim": config.embed_dim, "n_embed": config.n_embed, "ddconfig": ddconfig,
                                 "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                                "params": {"disc_start": 0, "disc_weight": 0.8}}}}}


def _write_official_files(directory: Path, model: ChameleonVQGAN, **extra_state) -> tuple[Path, Path]:
    """vqgan.yaml and a Lightning-style vqgan.ckpt with training-only loss weights next to the model's."""
    yaml_path, ckpt_path = directory / "vqgan.yaml", directory / "vqgan.ckpt"
    yaml_path.write_text(yaml.safe_dump(_yaml_document(model.config)))
    state = dict(model.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    state["loss.discriminator.main.0.bias"] = torch.randn(8)
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    state.update(extra_state)
    torch.save({"epoch": 3, "global_step": 5, "pytorch-lightning_version": "1.0.8", "state_dict": state}, ckpt_path)
    return yaml_path, ckpt_path


# ------------------------------------------------------------------------------------------- config


def test_config_from_yaml_reads_the_official_fields(tmp_path):
    path = tmp_path / "vqgan.yaml"
    path.write_text(yaml.safe_dump(_yaml_document(TINY)))
    config = ChameleonVQGANConfig.from_yaml(path)
    assert config == TINY
    assert config.ch_mult == (1, 2) and config.attn_resolutions == (8,) and config.downsample == 2


@pytest.mark.parametrize(("change", "message"), [
    ({"tanh_out": True}, "tanh_out"),
    ({"resamp_with_conv": False}, "resamp_with_conv"),
    ({"mystery": 1}, "unknown ddconfig fields"),
    ({"attn_type": "linear"}, "attn_type"),
])
def test_config_refuses_options_that_would_change_the_network(tmp_path, change, message):
    document = _yaml_document(TINY)
    document["model"]["params"]["ddconfig"].update(change)
    path = tmp_path / "vqgan.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ValueError, match=message):
        ChameleonVQGANConfig.from_yaml(path)


def test_config_explains_a_yaml_without_ddconfig(tmp_path):
    path = tmp_path / "vqgan.yaml"
    path.write_text(yaml.safe_dump({"model": {"params": {"n_embed": 16}}}))
    with pytest.raises(ValueError, match="model.params.ddconfig"):
        ChameleonVQGANConfig.from_yaml(path)
    with pytest.raises(FileNotFoundError, match="vqgan.yaml"):
        ChameleonVQGANConfig.from_yaml(tmp_path / "missing" / "vqgan.yaml")


def test_default_model_has_chameleon_checkpoint_layout():
    with torch.device("meta"):
        model = ChameleonVQGAN(ChameleonVQGANConfig())
    state = model.state_dict()
    expected_shapes = {
        "quantize.embedding.weight": (8192, 256),
        "quant_conv.weight": (256, 256, 1, 1),
        "post_quant_conv.weight": (256, 256, 1, 1),
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.mid.block_2.conv1.weight": (512, 512, 3, 3),
        "decoder.up.4.block.0.conv1.weight": (512, 512, 3, 3),
        "decoder.up.4.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    # attn_resolutions [] : attention only in the middle; no resampling past the last level.
    assert not any(".attn." in key for key in state)
    assert not any(key.startswith(("encoder.down.4.downsample", "decoder.up.0.upsample")) for key in state)
    assert len(state) == 293  # equal to the official VQModel's keys (checked in the parity test)
    assert sum(p.numel() for p in model.parameters()) == 68_718_467
    assert ChameleonVQGANConfig().downsample == 16


def test_group_norms_and_attention_placement():
    model = ChameleonVQGAN(TINY)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.eps == 1e-6 for m in norms)
    keys = model.state_dict().keys()
    # resolution 16: the encoder's level 1 and the decoder's level 1 run at side 8 and get attention.
    assert {k.split(".")[2] for k in keys if k.startswith("encoder.down.") and ".attn." in k} == {"1"}
    assert {k.split(".")[4] for k in keys if k.startswith("decoder.up.1.attn.")} == {"0", "1"}
    assert not any(k.startswith("decoder.up.0.attn.") for k in keys)
    assert not any("dropout" in k or "temb" in k for k in keys)


# --------------------------------------------------------------------------------- checkpoint loading


def test_official_files_round_trip_through_the_loader(tmp_path):
    model = _randomised(seed=0)
    yaml_path, ckpt_path = _write_official_files(tmp_path, model)

    loaded = load_chameleon_vqgan(yaml_path, ckpt_path)
    assert not loaded.training and loaded.config == TINY
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    codes = torch.randint(0, TINY.n_embed, (2, 12))
    fresh = _randomised(seed=1)
    assert not torch.allclose(fresh.decode_codes(codes, (3, 4)), model.decode_codes(codes, (3, 4)))
    assert torch.equal(loaded.decode_codes(codes, (3, 4)), model.decode_codes(codes, (3, 4)))


def test_loader_warns_about_keys_outside_the_model_and_needs_every_model_key(tmp_path, caplog):
    """As the official loader (strict=False) extra keys are tolerated, but named; a missing model key is an error."""
    model = _randomised()
    _, ckpt_path = _write_official_files(tmp_path, model, **{"ema.decoder.conv_out.weight": torch.zeros(1)})
    with caplog.at_level(logging.WARNING):
        loaded = load_chameleon_vqgan(tmp_path / "vqgan.yaml", ckpt_path)
    assert "ema.decoder.conv_out.weight" in caplog.text and str(ckpt_path) in caplog.text
    assert "loss." not in caplog.text  # the training-only loss weights are dropped without a warning
    assert torch.equal(loaded.decoder.conv_out.weight, model.decoder.conv_out.weight)

    state = dict(model.state_dict())
    del state["decoder.conv_out.bias"]
    torch.save({"state_dict": state, "global_step": 5}, ckpt_path)
    with pytest.raises(CheckpointError, match="missing keys.*decoder.conv_out.bias"):
        load_chameleon_vqgan(tmp_path / "vqgan.yaml", ckpt_path)


class CallbackState:
    """Stands in for a Lightning callback pickled next to the weights."""

    def __init__(self) -> None:
        self.best_model_score = torch.tensor(0.5)


class HyperParameters(dict):
    """Stands in for the AttributeDict / DictConfig Lightning pickles as `hyper_parameters`."""


EXPLOITED = {"flag": False}


def _exploit() -> None:
    EXPLOITED["flag"] = True


class ReduceExploit:
    def __reduce__(self):
        return (_exploit, ())


class SystemExploit:
    """Unpickling this runs a shell command, as a malicious checkpoint would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class StateExploit:
    def __setstate__(self, state) -> None:
        _exploit()


def _write_lightning_checkpoint(path: Path, model: ChameleonVQGAN, marker: Path, legacy: bool = False) -> Path:
    """A Lightning-style vqgan.ckpt: state_dict next to callbacks, hyper-parameters and hostile objects."""
    hyper = HyperParameters(embed_dim=model.config.embed_dim, ckpt_path=None, lossconfig={"disc_start": 0})
    state = {**model.state_dict(), "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4)}
    checkpoint = {"epoch": 3, "global_step": 5, "pytorch-lightning_version": "1.0.8", "state_dict": state,
                  "callbacks": {CallbackState: CallbackState()}, "hyper_parameters": hyper,
                  "hparams_name": "kwargs", "optimizer_states": [{"exploit": ReduceExploit()}],
                  "lr_schedulers": [SystemExploit(marker), StateExploit()]}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    return path


def test_lightning_checkpoint_is_refused_with_the_command_that_converts_it(tmp_path):
    model = _randomised()
    yaml_path, _ = _write_official_files(tmp_path, model)
    ckpt_path = _write_lightning_checkpoint(tmp_path / "vqgan.ckpt", model, tmp_path / "marker")
    with pytest.raises(CheckpointError) as info:
        load_chameleon_vqgan(yaml_path, ckpt_path)
    message = str(info.value)
    assert f"python -m lineareval.models.convert convert-vqgan {ckpt_path} {tmp_path / 'vqgan.safetensors'}" in message
    assert "model.chameleon_dir" in message and not (tmp_path / "marker").exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_convert_vqgan_rebuilds_tensors_and_never_runs_pickled_code(tmp_path, legacy, caplog):
    from lineareval.models.convert import convert_vqgan

    model = _randomised()
    marker = tmp_path / "marker"
    ckpt_path = _write_lightning_checkpoint(tmp_path / "vqgan.ckpt", model, marker, legacy=legacy)
    EXPLOITED["flag"] = False
    with caplog.at_level(logging.INFO):
        convert_vqgan(ckpt_path, tmp_path / "vqgan.safetensors")
    assert EXPLOITED["flag"] is False and not marker.exists()
    for name in ("CallbackState", "HyperParameters", "_exploit", "system", "StateExploit"):
        assert name in caplog.text  # replaced by inert stubs, and said so

    yaml_path = tmp_path / "vqgan.yaml"
    yaml_path.write_text(yaml.safe_dump(_yaml_document(model.config)))
    loaded = load_chameleon_vqgan(yaml_path, tmp_path / "vqgan.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    # The payloads are live: an unrestricted unpickler runs them, so the checks above mean something.
    torch.load(ckpt_path, weights_only=False)
    assert EXPLOITED["flag"] is True and marker.exists()
    EXPLOITED["flag"] = False


def test_convert_vqgan_command_line(tmp_path):
    model = _randomised()
    marker = tmp_path / "marker"
    ckpt_path = _write_lightning_checkpoint(tmp_path / "vqgan.ckpt", model, marker)
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "lineareval.models.convert", "convert-vqgan", str(ckpt_path),
                           str(tmp_path / "out.safetensors")], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "out.safetensors")
    assert torch.equal(tensors["decoder.conv_out.weight"], model.decoder.conv_out.weight)
    bad = subprocess.run([sys.executable, "-m", "lineareval.models.convert", "convert-vqgan",
                          str(tmp_path / "absent.ckpt"), str(tmp_path / "x.safetensors")], cwd=repo,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "absent.ckpt" in bad.stderr


def test_weights_prefer_vqgan_safetensors_and_accept_a_renamed_one(tmp_path):
    from safetensors.torch import save_file

    model = _randomised()
    _write_lightning_checkpoint(tmp_path / "vqgan.ckpt", model, tmp_path / "m")
    assert find_vqgan_weights(tmp_path) == tmp_path / "vqgan.ckpt"
    save_file(dict(model.state_dict()), tmp_path / "vqgan.safetensors")
    assert find_vqgan_weights(tmp_path) == tmp_path / "vqgan.safetensors"  # preferred over the Lightning file

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    save_file(dict(model.state_dict()), renamed / "vqgan.ckpt")  # a safetensors file under the official name
    (renamed / "vqgan.yaml").write_text(yaml.safe_dump(_yaml_document(model.config)))
    loaded = load_chameleon_vqgan(renamed / "vqgan.yaml", find_vqgan_weights(renamed))
    assert torch.equal(loaded.decoder.conv_out.weight, model.decoder.conv_out.weight)
    with pytest.raises(FileNotFoundError, match="vqgan.safetensors or vqgan.ckpt"):
        find_vqgan_weights(tmp_path / "absent")


# ------------------------------------------------------------------------------------------ decoding


def test_decode_codes_is_a_raster_order_codebook_lookup():
    model = _randomised()
    grid = (2, 3)  # non-square, so a transposed layout would fail
    codes = torch.randint(0, TINY.n_embed, (2, grid[0] * grid[1]))

    codebook = model.quantize.embedding.weight.detach()
    latents = torch.empty(2, TINY.embed_dim, *grid)
    for b in range(2):
        for row in range(grid[0]):
            for col in range(grid[1]):
                latents[b, :, row, col] = codebook[codes[b, row * grid[1] + col]]
    with torch.no_grad():
        expected = model.decoder(model.post_quant_conv(latents))

    images = model.decode_codes(codes, grid)
    assert images.shape == (2, 3, grid[0] * TINY.downsample, grid[1] * TINY.downsample)
    assert torch.equal(images, expected)


def test_decode_codes_rejects_bad_shapes_and_codes():
    model = ChameleonVQGAN(TINY)
    with pytest.raises(ValueError, match="grid"):
        model.decode_codes(torch.zeros(1, 5, dtype=torch.long), (2, 3))
    with pytest.raises(ValueError, match="bpe_to_code"):
        model.decode_codes(torch.full((1, 6), TINY.n_embed), (2, 3))


def test_encode_returns_the_nearest_codebook_entry_in_raster_order():
    model = _randomised()
    images = torch.rand(2, 3, 8, 12) * 2 - 1
    codes = model.encode(images)
    assert codes.dtype == torch.int64 and codes.shape == (2, 4 * 6)
    with torch.no_grad():
        latents = model.quant_conv(model.encoder(images))  # (B, D, h, w)
    flat = latents.permute(0, 2, 3, 1).reshape(2, -1, TINY.embed_dim)
    distances = torch.cdist(flat, model.quantize.embedding.weight.detach().expand(2, -1, -1))
    assert torch.equal(codes, distances.argmin(dim=-1))

    rows = model.quantize.embedding.weight.detach()[torch.tensor([5, 0, 15])]
    assert model.quantize.nearest(rows).tolist() == [5, 0, 15]


def test_to_uint8_truncates_like_the_official_pil_conversion():
    images = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0]).reshape(1, 1, 1, 7).expand(1, 3, 1, 7)
    pixels = to_uint8(images)
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 1, 7, 3)
    assert pixels[0, 0, :, 0].tolist() == [0, 0, 63, 127, 254, 255, 255]

    # The official `_pil_from_chw_tensor` steps, on random values around the clamp limits.
    chw = torch.randn(3, 5, 7) * 1.5
    official = (((torch.clamp(chw, -1.0, 1.0) + 1.0) / 2.0).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    assert np.array_equal(to_uint8(chw[None])[0].numpy(), official)


# ---------------------------------------------------------------------------------------- vocabulary

# Written by hand from the letter rule (A=0 ... J=9, terminated by Z). Ids follow the alphabetical order
# of the names, so the map is not monotonic: code 1 ("IMGIMGBZ") sorts after code 15 ("IMGIMGBFZ").
HAND_VOCAB = {
    "<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3,
    "IMGIMGAZ": 4, "IMGIMGBAZ": 5, "IMGIMGBBZ": 6, "IMGIMGBCZ": 7, "IMGIMGBDZ": 8, "IMGIMGBEZ": 9,
    "IMGIMGBFZ": 10, "IMGIMGBZ": 11, "IMGIMGCZ": 12, "IMGIMGDZ": 13, "IMGIMGEZ": 14, "IMGIMGFZ": 15,
    "IMGIMGGZ": 16, "IMGIMGHZ": 17, "IMGIMGIZ": 18, "IMGIMGJZ": 19,
    "<eoss>": 8196, "<racm3:break>": 8197, "<reserved08706>": 8710, "<reserved08799>": 8803,
    "<reserved08800>": 8804, "<reserved08801>": 8805, "<reserved08802>": 8806, "<reserved08824>": 8828,
    "<reserved08832>": 8836, "hello": 9000,
}


@pytest.fixture
def tokenizer_json(tmp_path) -> Path:
    path = tmp_path / "text_tokenizer.json"
    added = [{"id": 8197, "content": "<racm3:break>", "special": True}]
    path.write_text(json.dumps({"version": "1.0", "added_tokens": added,
                                "model": {"type": "BPE", "vocab": HAND_VOCAB, "merges": []}}))
    return path


def test_code_from_name_follows_the_letter_rule():
    assert code_from_name("IMGIMGAZ") == 0
    assert code_from_name("IMGIMGBAZ") == 10
    assert code_from_name("IMGIMGBAAZ") == 100
    assert code_from_name("IMGIMGIBJBZ") == 8191
    for bad in ("IMGIMGKZ", "IMGIMGAB", "IMGIMGZ"):
        with pytest.raises(ValueError, match="IMGIMG"):
            code_from_name(bad)


def test_vocabulary_maps_bpe_ids_to_codes_and_back(tokenizer_json):
    vocab = ImageVocabulary.from_json(tokenizer_json)
    assert vocab.num_codes == 16
    assert vocab.image_token_ids.tolist() == list(range(4, 20))
    assert vocab.bpe_to_code(torch.tensor([4, 5, 10, 11, 19])).tolist() == [0, 10, 15, 1, 9]
    assert vocab.code_to_bpe(torch.tensor([[1, 10], [15, 0]])).tolist() == [[11, 5], [10, 4]]

    ids = vocab.image_token_ids[torch.randperm(16)].reshape(4, 4)
    assert torch.equal(vocab.code_to_bpe(vocab.bpe_to_code(ids)), ids)
    assert sorted(vocab.bpe_to_code(vocab.image_token_ids).tolist()) == list(range(16))


def test_vocabulary_refuses_ids_that_are_not_image_tokens(tokenizer_json):
    vocab = ImageVocabulary.from_json(tokenizer_json)
    with pytest.raises(ValueError, match=r"8803 \('<reserved08799>'\)"):
        vocab.bpe_to_code(torch.tensor([4, 8803, 5]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.bpe_to_code(torch.tensor([70000]))
    with pytest.raises(ValueError, match="no image token"):
        vocab.code_to_bpe(torch.tensor([3, 16]))


def test_vocabulary_gives_lumina_layout_tokens(tokenizer_json):
    vocab = ImageVocabulary.from_json(tokenizer_json)
    assert (vocab.image_start_id, vocab.image_end_id, vocab.new_line_id) == (8197, 8196, 8803)
    # 768 px = 48 codes = 24 patches of 32 px: <reserved08824>; Lumina's decoder reads 8828 - 8804 = 24.
    assert vocab.size_token_ids(48, 48) == (8828, 8828)
    assert vocab.size_token_ids(2, 4) == (8805, 8806)
    assert vocab.size_token_ids(64, 48) == (8836, 8828)
    assert vocab.grid_from_size_ids(8836, 8828) == (64, 48)
    with pytest.raises(ValueError, match="multiple of 2"):
        vocab.size_token_ids(47, 48)
    with pytest.raises(KeyError, match="<reserved08830>"):
        vocab.size_token_ids(60, 48)
    with pytest.raises(ValueError, match="not a Lumina size token"):
        vocab.grid_from_size_ids(8803, 8828)


def test_vocabulary_rejects_inconsistent_tokenizer_files(tmp_path):
    path = tmp_path / "text_tokenizer.json"
    path.write_text(json.dumps({"added_tokens": [{"id": 1, "content": "<eoss>"}], "model": {"vocab": HAND_VOCAB}}))
    with pytest.raises(ValueError, match="added_tokens"):
        ImageVocabulary.from_json(path)
    with pytest.raises(ValueError, match="no image tokens"):
        ImageVocabulary({"<s>": 0, "hello": 1})
    with pytest.raises(ValueError, match="same code"):
        ImageVocabulary({"IMGIMGBZ": 4, "IMGIMGABZ": 5})  # both spell code 1


# ----------------------------------------------------------------------- parity with the official code
