"""LlamaGen: official checkpoint layouts through the real builder, RoPE, sizes and determinism."""

from __future__ import annotations

import argparse

import pytest
import torch

from lineareval.decoding.method import Sequential

from lineareval.cache.full import Full
from lineareval.models.checkpoint import CheckpointError
from lineareval.models.llamagen import SIZES, LlamaGen, LlamaGenConfig, build_llamagen, rope_table_2d
from lineareval.models.weights import MissingWeightsError
from lineareval.runner import build_generator


def build(cfg):
    """The generator exactly as the runner builds it."""
    return build_generator(cfg, torch.device("cpu"), torch.float32)


@pytest.fixture
def tiny_generator(make_config):
    return build(make_config("weights=random"))


LAYOUTS = {
    "model": lambda sd: {"model": sd, "steps": 100, "args": argparse.Namespace(gpt_model="GPT-B", lr=1e-4)},
    "module": lambda sd: {"module": sd},
    "state_dict": lambda sd: {"state_dict": sd},
    "fsdp_raw": lambda sd: dict(sd),
    "raw_with_freqs_cis": lambda sd: {**sd, "freqs_cis": torch.zeros(5, 2)},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_checkpoint_round_trip_in_each_official_layout(make_config, tiny_generator, tmp_path, layout):
    gpt_path, vq_path = tmp_path / "gpt.pt", tmp_path / "vq.pt"
    torch.save(LAYOUTS[layout](tiny_generator.model.state_dict()), gpt_path)
    torch.save({"model": tiny_generator.family.vq.state_dict()}, vq_path)
    loaded = build(make_config(f"model.gpt_ckpt={gpt_path}", f"model.vq_ckpt={vq_path}", "seed=5"))
    assert loaded.weights == "checkpoint" and loaded.weight_files == [str(gpt_path), str(vq_path)]
    labels, tokens = torch.tensor([1, 4]), torch.randint(0, 1024, (2, 20))
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(labels, tokens), tiny_generator.model(labels, tokens), rtol=0, atol=0)
        codes = torch.randint(0, 1024, (1, 256))
        torch.testing.assert_close(loaded.decode_images(codes), tiny_generator.decode_images(codes), rtol=0, atol=0)


def test_mismatched_checkpoint_names_the_keys(make_config, tiny_generator, tmp_path):
    state = tiny_generator.model.state_dict()
    state.pop("layers.1.ffn_norm.weight")
    state["layers.0.attention.wqkv.weight"] = torch.zeros(3, 3)
    state["extra.bias"] = torch.zeros(2)
    torch.save({"model": state}, tmp_path / "gpt.pt")
    torch.save({"model": tiny_generator.family.vq.state_dict()}, tmp_path / "vq.pt")
    cfg = make_config(f"model.gpt_ckpt={tmp_path / 'gpt.pt'}", f"model.vq_ckpt={tmp_path / 'vq.pt'}")
    with pytest.raises(CheckpointError) as error:
        build(cfg)
    message = str(error.value)
    assert "layers.1.ffn_norm.weight" in message and "extra.bias" in message
    assert "layers.0.attention.wqkv.weight" in message and "gpt.pt" in message


def test_missing_official_files_offline_name_each_file_and_the_folder(make_config, tmp_path):
    cfg = make_config("model=llamagen_xl")
    with pytest.raises(MissingWeightsError) as error:
        build(cfg)
    message = str(error.value)
    for expected in ("c2i_XL_384.pt", "vq_ds16_c2i.pt", str(tmp_path / "weights"), "FoundationVision/LlamaGen",
                     "weights=random"):
        assert expected in message


def test_rope_is_2d_and_stays_fp32():
    table = rope_table_2d(grid=4, head_dim=8, base=10000.0, prefix_len=1)
    assert table.shape == (17, 4, 2) and (table[0] == 0).all()  # the class token is not rotated
    angles = torch.atan2(table[1:, :, 1], table[1:, :, 0]).view(4, 4, 4)  # (row, col, pair)
    assert torch.allclose(angles[:, 0, :2], angles[:, 3, :2]) and not torch.allclose(angles[0, :, :2], angles[3, :, :2])
    assert torch.allclose(angles[0, :, 2:], angles[3, :, 2:]) and not torch.allclose(angles[:, 0, 2:], angles[:, 3, 2:])
    model = LlamaGen(LlamaGenConfig(dim=64, n_layer=1, n_head=4, vocab_size=32, num_classes=3, image_size=64))
    model.to(torch.bfloat16)
    assert model.rope.dtype == torch.float32 and model.tok_embeddings.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("size, millions", [("B", 111), ("L", 343), ("XL", 775), ("XXL", 1400), ("3B", 3100)])
def test_named_sizes_match_the_official_parameter_counts(size, millions):
    with torch.device("meta"):
        model = build_llamagen(size)
    count = sum(parameter.numel() for parameter in model.parameters()) / 1e6
    assert abs(count - millions) / millions < 0.03, count
    assert (model.config.n_layer, model.config.n_head, model.config.dim) == SIZES[size]


def test_model_configs_carry_the_official_sizes(make_config):
    for name, size in [("llamagen_b", "B"), ("llamagen_l", "L"), ("llamagen_xl", "XL"), ("llamagen_xxl", "XXL"),
                       ("llamagen_3b", "3B")]:
        model = make_config(f"model={name}").model
        assert (model.n_layer, model.n_head, model.dim) == SIZES[size]
        assert model.gpt_file == f"c2i_{size}_384.pt" and model.vq_file == "vq_ds16_c2i.pt"
        assert model.image_size == 384 and model.sampling.cfg_scale == 1.75


def test_same_seed_and_index_give_the_same_sample_at_any_batch_size(make_config):
    tiny_generator = build(make_config("weights=random", "model.image_size=128"))  # 8x8 tokens
    ids = torch.arange(8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]) % 10
    results = []
    for batch in (1, 3, 8):
        parts = []
        for start in range(0, 8, batch):
            chunk = slice(start, start + batch)
            parts.append(tiny_generator.generate(labels[chunk], ids[chunk], Full(), 64, seed=11, method=Sequential()).tokens)
        results.append(torch.cat(parts))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    other_seed = tiny_generator.generate(labels, ids, Full(), 64, seed=12, method=Sequential()).tokens
    assert (other_seed != results[0]).float().mean() > 0.5
