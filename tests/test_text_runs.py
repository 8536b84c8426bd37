"""Text-conditional runs end to end: prompts, per-(seed, p, j) samples, hub folders and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import JanusForConditionalGeneration, PreTrainedTokenizerFast

from lineareval.benchmarks.samples import load_prompts, text_samples
from lineareval.models.weights import MissingWeightsError
from lineareval.runner import run
from test_janus import tiny_config

SPECIAL = ["<pad>", "<bos>", "<begin_of_image>", "<unk>", "<|User|>", "<|Assistant|>"]


@pytest.fixture(scope="module")
def janus_folder(tmp_path_factory) -> Path:
    """A tiny transformers-native Janus folder with a real (tiny) tokenizer, as on the hub."""
    folder = tmp_path_factory.mktemp("Janus-tiny")
    torch.manual_seed(0)
    JanusForConditionalGeneration(tiny_config(patches=6)).save_pretrained(folder)
    words = SPECIAL + ["a", "red", "apple", "green", "pear", ":"]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", pad_token="<pad>",
                                        unk_token="<unk>", additional_special_tokens=SPECIAL[2:3] + SPECIAL[4:])
    tokenizer.save_pretrained(folder)
    return folder


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
