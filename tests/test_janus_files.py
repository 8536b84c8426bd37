"""Janus-Pro folders as users have them: DeepSeek's own release layout next to the transformers-native one,
the official prompt and unconditional rows, and the bf16 RoPE option."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import JanusForConditionalGeneration

from lineareval.generators.base import Generator
from lineareval.generators.janus import load_janus as build_janus
from lineareval.models.checkpoint import CheckpointError
from lineareval.models.janus import load_janus_networks as load_janus
from lineareval.runner import run
from test_janus import tiny_config
from tokenizer_files import JANUS_SPECIAL, write_byte_level_tokenizer, write_janus_tokenizer

PATCHES = 6


def _official_key(key: str) -> str:
    """transformers-native name -> the name in DeepSeek's release (the inverse of transformers' Janus converter)."""
    rules = [(r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
             (r"^model\.generation_embeddings\.", "gen_embed."),
             (r"^model\.generation_aligner\.fc1\.", "gen_aligner.layers.0."),
             (r"^model\.generation_aligner\.hidden_layers\.0\.", "gen_aligner.layers.2."),
             (r"^model\.generation_head\.proj_out\.", "gen_head.output_mlp_projector."),
             (r"^model\.generation_head\.", "gen_head."), (r"^model\.aligner\.fc1\.", "aligner.layers.0."),
             (r"^model\.aligner\.hidden_layers\.0\.", "aligner.layers.2."),
             (r"^model\.vision_model\.", "vision_model.vision_tower."), (r"^model\.vqmodel\.", "gen_vision_model."),
             (r"\.encoder\.down\.", ".encoder.conv_blocks."), (r"\.decoder\.up\.", ".decoder.conv_blocks."),
             (r"\.block\.(\d+)\.", r".res.\1."), (r"\.mid\.block_1\.", ".mid.0."), (r"\.mid\.attn_1\.", ".mid.1."),
             (r"\.mid\.block_2\.", ".mid.2.")]
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def official_config(config) -> dict:
    """config.json of deepseek-ai/Janus-Pro-*: MultiModalityConfig with per-module `cls` + `params`."""
    text, vq = config.text_config, config.vq_config
    return {"architectures": ["MultiModalityCausalLM"], "model_type": "multi_modality", "torch_dtype": "bfloat16",
            "transformers_version": "4.33.1",
            "language_config": {"hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
                                "max_position_embeddings": text.max_position_embeddings, "model_type": "llama",
                                "num_attention_heads": text.num_attention_heads,
                                "num_hidden_layers": text.num_hidden_layers,
                                "num_key_value_heads": text.num_key_value_heads, "torch_dtype": "bfloat16",
                                "vocab_size": text.vocab_size},
            "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision",
                              "params": {"image_size": 16 * PATCHES, "model_name": "siglip_large_patch16_384",
                                         "select_feature": "same", "select_layer": -1}},
            "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                               "params": {"depth": 2, "input_dim": 32, "n_embed": 64, "projector_type": "mlp_gelu"}},
            "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision",
                                  "params": {"image_token_size": vq.num_embeddings, "n_embed": vq.embed_dim}},
            "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner",
                                   "params": {"depth": 2, "input_dim": vq.embed_dim, "n_embed": vq.projection_dim,
                                              "projector_type": "mlp_gelu"}},
            "gen_head_config": {"cls": "vision_head", "model_type": "gen_head",
                                "params": {"image_token_embed": vq.image_token_embed_dim,
                                           "image_token_size": vq.num_embeddings, "n_embed": text.hidden_size}}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny random Janus: its transformers-native folder and its state dict under DeepSeek's names."""
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(tiny_config(patches=PATCHES)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1 and ("language_model" in name or "generation" in name):
                parameter.normal_(0.0, 0.3)
    native = tmp_path_factory.mktemp("Janus-native")
    model.save_pretrained(native)
    write_janus_tokenizer(native)
    official = {_official_key(key): value.clone() for key, value in model.state_dict().items()}
    official["gen_vision_model.quantize.codebook_used"] = torch.zeros(65536)  # a training buffer of VQ-16
    return model, native, official


def test_official_names_are_those_of_deepseeks_release(reference):
    keys = set(reference[2])
    for key in ("language_model.model.embed_tokens.weight", "language_model.model.layers.0.self_attn.q_proj.weight",
                "language_model.model.norm.weight", "language_model.lm_head.weight", "gen_embed.weight",
                "gen_aligner.layers.0.weight", "gen_aligner.layers.2.bias", "gen_head.output_mlp_projector.weight",
                "gen_head.vision_head.weight", "gen_vision_model.quantize.embedding.weight",
                "gen_vision_model.encoder.conv_blocks.0.res.0.conv1.weight", "gen_vision_model.encoder.mid.1.q.weight",
                "gen_vision_model.decoder.conv_blocks.0.attn.0.proj_out.weight",
                "gen_vision_model.decoder.mid.2.conv2.bias", "gen_vision_model.post_quant_conv.weight",
                "gen_vision_model.decoder.conv_blocks.0.upsample.conv.weight",
                "aligner.layers.0.weight"):
        assert key in keys, key
    assert not any(key.startswith("model.") for key in keys)


def write_official(folder: Path, reference, layout: str) -> Path:
    """deepseek-ai/Janus-Pro-* as downloaded: official config.json, weights in `layout`, DeepSeek's tokenizer."""
    model, _, official = reference
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(official_config(model.config)))
    if layout == "bin":
        torch.save(official, folder / "pytorch_model.bin")
    elif layout == "sharded-bin":
        keys = sorted(official)
        shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
                  "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
        for name, part in shards.items():
            torch.save({key: official[key] for key in part}, folder / name)
        weight_map = {key: name for name, part in shards.items() for key in part}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file({key: value.contiguous() for key, value in official.items()}, folder / "model.safetensors")
    write_janus_tokenizer(folder)
    return folder


@pytest.mark.parametrize("layout", ["bin", "sharded-bin", "safetensors"])
def test_official_folder_loads_the_same_networks_as_the_native_one(reference, tmp_path, layout):
    folder = write_official(tmp_path / "Janus-Pro-1B", reference, layout)
    network, vqmodel = load_janus(folder, num_patches=PATCHES)
    native_network, native_vq = load_janus(reference[1])
    for ours, theirs in ((network, native_network), (vqmodel, native_vq)):
        expected = theirs.state_dict()
        assert set(ours.state_dict()) == set(expected)
        for key, value in ours.state_dict().items():
            assert torch.equal(value, expected[key]), key
    codes = torch.randint(0, 64, (1, PATCHES * PATCHES))
    assert torch.equal(vqmodel.decode(codes), native_vq.decode(codes))


def test_official_folder_runs_as_the_native_one(make_config, reference, tmp_path):
    folder = write_official(tmp_path / "Janus-Pro-1B", reference, "bin")
    common = ("model=janus_pro_1b", "prompt=a red apple", "images_per_prompt=2", "cache=linear", "keep=1/3")
    official = make_config(*common, f"model.path={folder}", f"model.gen.num_patches={PATCHES}",
                           f"run_dir={tmp_path / 'official'}")
    native = make_config(*common, f"model.path={reference[1]}", f"run_dir={tmp_path / 'native'}")
    record = run(official)
    run(native)
    tokens = np.load(Path(official.run_dir) / "tokens.npz")["tokens"]
    assert np.array_equal(tokens, np.load(Path(native.run_dir) / "tokens.npz")["tokens"])
    assert record["weights_files"] == [str(folder / "pytorch_model.bin")]


def test_folder_of_neither_layout_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(CheckpointError) as error:
        load_janus(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "config.json") in message and "language_config" in message and "text_config" in message


def test_folder_without_weights_lists_both_formats(make_config, reference, tmp_path):
    from lineareval.models.weights import MissingWeightsError

    folder = tmp_path / "Janus-Pro-1B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(official_config(reference[0].config)))
    write_janus_tokenizer(folder)
    with pytest.raises(MissingWeightsError, match=r"\*\.safetensors or pytorch_model\*\.bin"):
        run(make_config("model=janus_pro_1b", f"model.path={folder}", "prompt=a red apple"))


def _build(folder: Path, **overrides) -> Generator:
    options = dict(name="janus", path=str(folder), weights="checkpoint", weights_dir=str(folder.parent),
                   device="cpu", dtype=torch.float32, text={"vocab_size": 300}, gen={"num_patches": PATCHES}, vq={},
                   sampling={"cfg_scale": 5.0, "cfg_interval": -1, "temperature": 1.0, "top_k": 0, "top_p": 1.0})
    return build_janus(**{**options, **overrides})


def _symbols(text: str) -> list[int]:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())  # tokenizer_files: byte symbols from id 10, no merges
    pieces = ByteLevel(add_prefix_space=False).pre_tokenize_str(text)
    return [10 + alphabet.index(symbol) for piece, _ in pieces for symbol in piece]


@pytest.mark.parametrize("post_bos", [True, False], ids=["tokenizer-adds-bos", "tokenizer-adds-nothing"])
def test_prompt_is_stripped_and_starts_with_bos_as_officially(reference, tmp_path, post_bos):
    """Official: tokenizer.encode(f"<|User|>: {prompt.strip()}\\n\\n<|Assistant|>:" + "<begin_of_image>"), BOS first."""
    folder = tmp_path / "Janus-native"
    folder.mkdir()
    for item in reference[1].iterdir():
        (folder / item.name).symlink_to(item)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink()
    write_janus_tokenizer(folder, post_bos=post_bos)
    adapter = _build(folder).family
    user, assistant, bos, boi = (JANUS_SPECIAL[name] for name in ("<|User|>", "<|Assistant|>",
                                                                  "<｜begin▁of▁sentence｜>", "<begin_of_image>"))
    expected = [bos, user, *_symbols(": a red apple\n\n"), assistant, *_symbols(":"), boi]
    assert adapter.encode(["  a red apple \n", "a red apple"]) == [expected, expected]


def test_unconditional_rows_use_the_pad_token_by_name(reference, tmp_path):
    """The official code pads with vocab['<｜▁pad▁｜>'], which need not be the tokenizer's pad_token."""
    folder = tmp_path / "Janus-native"
    folder.mkdir()
    for item in reference[1].iterdir():
        if not item.name.startswith(("tokenizer", "special_tokens")):
            (folder / item.name).symlink_to(item)
    write_janus_tokenizer(folder, pad="<｜end▁of▁sentence｜>")
    adapter = _build(folder).family
    assert adapter.tokenizer.pad_token_id == JANUS_SPECIAL["<｜end▁of▁sentence｜>"]
    ids, present = adapter.prefix_batch(["a red apple"])
    cond, uncond = ids.tolist()
    pad = JANUS_SPECIAL["<｜▁pad▁｜>"]
    assert uncond == [cond[0]] + [pad] * (len(cond) - 2) + [cond[-1]] and bool(present.all())


def test_tokenizer_without_the_official_pad_token_is_refused(reference, tmp_path):
    folder = tmp_path / "Janus-native"
    folder.mkdir()
    for item in reference[1].iterdir():
        if not item.name.startswith(("tokenizer", "special_tokens")):
            (folder / item.name).symlink_to(item)
    special = {token: index for token, index in JANUS_SPECIAL.items() if token != "<｜▁pad▁｜>"}
    write_byte_level_tokenizer(folder, special, 10, bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>",
                               pad="<｜end▁of▁sentence｜>")
    with pytest.raises(ValueError, match=f"{folder}.*<｜▁pad▁｜>"):
        _build(folder)


# ------------------------------------------------------------------------------------------ bf16 RoPE


def _positions() -> torch.Tensor:
    return torch.arange(0, 600, dtype=torch.long)[None]  # long enough for bf16-rounded frequencies to drift


@pytest.mark.parametrize("choice", ["official", "float32"])
def test_rope_choice_matches_its_transformers_counterpart_exactly(reference, choice):
    """official = DeepSeek's `model.to(torch.bfloat16)` (the rotary buffer is cast with the weights);
    float32 = transformers' `from_pretrained(dtype=torch.bfloat16)` (the buffer stays fp32)."""
    from lineareval.models.janus import set_rope_inv_freq

    model, native, _ = reference
    network, _ = load_janus(native, torch.bfloat16)
    set_rope_inv_freq(network, choice)
    if choice == "official":
        theirs = JanusForConditionalGeneration.from_pretrained(native).to(torch.bfloat16)
    else:
        theirs = JanusForConditionalGeneration.from_pretrained(native, dtype=torch.bfloat16)
    rotary = theirs.model.language_model.rotary_emb
    x = torch.zeros(1, 1, dtype=torch.bfloat16)
    cos, sin = rotary(x, _positions())
    ours_cos, ours_sin = network.language_model.rotary(_positions(), torch.bfloat16)
    assert torch.equal(ours_cos[:, 0], cos) and torch.equal(ours_sin[:, 0], sin)


def test_rope_choices_differ_in_bf16_and_agree_in_fp32(reference):
    from lineareval.models.janus import set_rope_inv_freq

    native = reference[1]
    tables = {}
    for dtype in (torch.bfloat16, torch.float32):
        for choice in ("official", "float32"):
            network, _ = load_janus(native, dtype)
            set_rope_inv_freq(network, choice)
            tables[dtype, choice] = network.language_model.rotary(_positions(), dtype)
    for official, plain in zip(tables[torch.float32, "official"], tables[torch.float32, "float32"]):
        assert torch.equal(official, plain)
    # In bf16 the official table is that of frequencies rounded to 8 significant bits. Worked out in float64,
    # the largest cos difference over these positions is that of the rounded vs exact frequencies; each bf16
    # cos is off by at most 2^-9 (|cos| <= 1), so the observed difference is within 2^-8 of it.
    from lineareval.models.layers import inverse_frequencies

    head_dim = reference[0].config.text_config.hidden_size // reference[0].config.text_config.num_attention_heads
    exact = inverse_frequencies(head_dim, 10000.0).double()
    angles = _positions()[0, :, None].double()
    expected = ((angles * exact).cos() - (angles * exact.to(torch.bfloat16).double()).cos()).abs().max().item()
    cos_official, cos_plain = tables[torch.bfloat16, "official"][0], tables[torch.bfloat16, "float32"][0]
    observed = (cos_official.double() - cos_plain.double()).abs().max().item()
    assert expected > 0.05 and abs(observed - expected) <= 2**-8
    with pytest.raises(ValueError, match="rope_inv_freq"):
        set_rope_inv_freq(network, "bfloat16")
