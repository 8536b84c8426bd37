"""Text-conditional runs end to end: prompts, per-(seed, p, j) samples, hub folders and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lineareval.benchmarks.samples import load_prompts, text_samples
from lineareval.models.weights import MissingWeightsError
from lineareval.runner import run

def test_prompt_sources(tmp_path):
    assert load_prompts("a red apple", None) == ["a red apple"]
    (tmp_path / "p.txt").write_text("a red apple\n\n a green pear \n")
    assert load_prompts(None, str(tmp_path / "p.txt")) == ["a red apple", "a green pear"]
    (tmp_path / "p.jsonl").write_text('{"caption": "x"}\n{"prompt": "y"}\n')
    assert load_prompts(None, str(tmp_path / "p.jsonl")) == ["x", "y"]
    (tmp_path / "p.json").write_text('["u", "v"]')
    assert load_prompts(None, str(tmp_path / "p.json")) == ["u", "v"]
    with pytest.raises(ValueError, match="prompt="):
        load_prompts(None, None)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompts(None, str(tmp_path / "missing.txt"))
    (tmp_path / "bad.json").write_text('[1, 2]')
    with pytest.raises(ValueError, match="not non-empty strings"):
        load_prompts(None, str(tmp_path / "bad.json"))


def test_sample_keys_depend_only_on_prompt_and_image_index():
    two = text_samples(["a", "b"], 2)
    three = text_samples(["a", "b", "c"], 3)
    assert two.conditions == ["a", "a", "b", "b"]
    assert set(two.sample_ids.tolist()) <= set(three.sample_ids.tolist())  # (p, j) keeps its key
    assert two.sample_ids.unique().numel() == 4


def test_janus_run_from_a_local_folder(make_config, janus_folder):
    overrides = ("model=janus_pro_1b", f"model.path={janus_folder}", "prompt=a red apple", "images_per_prompt=3",
                 "batch_size=2", "cache=linear", "keep=1/3")
    record = run(make_config(*overrides))
    cfg = make_config(*overrides)
    arrays = np.load(Path(cfg.run_dir) / "tokens.npz")
    assert arrays["tokens"].shape == (3, 36) and list(arrays["prompts"]) == ["a red apple"]
    assert list(arrays["prompt_index"]) == [0, 0, 0] and list(arrays["image_index"]) == [0, 1, 2]
    assert np.load(Path(cfg.run_dir) / "samples.npz")["arr_0"].shape == (3, 12, 12, 3)
    assert record["weights"] == "checkpoint" and record["weights_files"][0].endswith("model.safetensors")
    assert record["num_samples"] == 3 and record["visual_budget"] == 12
    # the same (seed, p, j) gives the same image whatever the batch
    alone = make_config(*overrides[:-4], "images_per_prompt=1", "batch_size=1", "cache=linear", "keep=1/3",
                        "run_dir=" + str(Path(cfg.run_dir).parent / "alone"))
    run(alone)
    assert np.array_equal(np.load(Path(alone.run_dir) / "tokens.npz")["tokens"][0], arrays["tokens"][0])


def test_text_model_without_prompts_says_how_to_give_them(make_config, janus_folder):
    with pytest.raises(ValueError, match="prompt="):
        run(make_config("model=janus_pro_1b", f"model.path={janus_folder}"))


def test_missing_janus_weights_offline_name_the_repo_and_folder(make_config, tmp_path):
    with pytest.raises(MissingWeightsError) as error:
        run(make_config("model=janus_pro_7b", "prompt=a red apple"))
    message = str(error.value)
    for expected in ("config.json", "tokenizer.json", str(tmp_path / "weights" / "Janus-Pro-7B"),
                     "hf download deepseek-community/Janus-Pro-7B", "weights=random"):
        assert expected in message


def test_janus_config_is_transformers_native(janus_folder):
    config = json.loads((janus_folder / "config.json").read_text())
    assert config["model_type"] == "janus" and "vq_config" in config


def image_token_name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(digit)) for digit in str(code)) + "Z"


@pytest.fixture(scope="module")
def lumina_folders(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Lumina-mGPT folder (HF layout, real vocabulary ids) and a tiny Chameleon tokenizer folder."""
    from safetensors.torch import save_file

    from lineareval.models.chameleon import ChameleonLM, ChameleonLMConfig
    from lineareval.models.chameleon_vqgan import ChameleonVQGAN, ChameleonVQGANConfig
    from test_chameleon_vqgan import _write_official_files
    from tokenizer_files import write_lumina_tokenizer

    model_dir, chameleon = tmp_path_factory.mktemp("Lumina-tiny"), tmp_path_factory.mktemp("chameleon")
    hf_config = {"model_type": "chameleon", "vocab_size": 9000, "hidden_size": 64, "intermediate_size": 128,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 512,
                 "rope_theta": 10000.0, "rms_norm_eps": 1e-5}
    (model_dir / "config.json").write_text(json.dumps(hf_config))
    torch.manual_seed(0)
    network = ChameleonLM(ChameleonLMConfig.from_hf_config(hf_config))
    save_file({key: value.contiguous() for key, value in network.state_dict().items()}, model_dir / "model.safetensors")
    write_lumina_tokenizer(model_dir)
    vqgan = ChameleonVQGAN(ChameleonVQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, resolution=16,
                                                n_embed=8192, embed_dim=4))
    _write_official_files(chameleon, vqgan)
    vocab = {image_token_name(code): 4 + code for code in range(8192)}
    vocab.update({"<eoss>": 8196, "<racm3:break>": 8197, "<reserved08799>": 8803, "<reserved08706>": 8710,
                  "<reserved08802>": 8806})
    (chameleon / "text_tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}}))
    return model_dir, chameleon


def test_lumina_run_from_local_folders(make_config, lumina_folders):
    model_dir, chameleon = lumina_folders
    cfg = make_config("model=lumina_mgpt_768", f"model.path={model_dir}", f"model.chameleon_dir={chameleon}",
                      "model.resolution=64", "prompt=a red apple", "images_per_prompt=2", "cache=linear", "keep=1/2")
    record = run(cfg)
    arrays = np.load(Path(cfg.run_dir) / "tokens.npz")
    rows = arrays["tokens"].reshape(2, 4, 5)
    assert (rows[:, :, -1] == 8803).all() and ((rows[:, :, :-1] >= 4) & (rows[:, :, :-1] <= 8195)).all()
    assert np.load(Path(cfg.run_dir) / "samples.npz")["arr_0"].shape == (2, 8, 8, 3)
    assert record["weights"] == "checkpoint" and record["visual_budget"] == 10
    assert record["kv_cache_capacity_bytes"] > 0
