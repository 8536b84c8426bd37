"""Chameleon LM (Lumina-mGPT's decoder) against transformers' ChameleonForConditionalGeneration.

A tiny random transformers model is saved as safetensors and loaded through our loader; every check
compares values: whole-sequence logits, the cached path (prefill + decode), left-padded prompts against
each prompt run alone, both `swin_norm` variants, Lumina's (model_parallel_size, head_dim) q/k norm
layout, sharded files, and strict key checking. transformers' logits are computed as
`lm_head(model.model(...).last_hidden_state)` so its image-token masking does not hide columns; one test
also checks the masked `.logits` on the other columns and that we do not mask.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CACHE_CONFIGS, decoder_depth, roundoff_tolerance
from lineareval.cache import TokenLayout
from lineareval.cache.full import Full
from lineareval.decoding.stepper import Stepper
from lineareval.models.layers import TextPrefix
from lineareval.keep import parse_keep
from lineareval.models.checkpoint import CheckpointError
from lineareval.models.chameleon import ChameleonLM, ChameleonLMConfig, load_chameleon_lm
from lineareval.models.weights import MissingWeightsError

transformers = pytest.importorskip("transformers")

HEADS, VOCAB = 4, 512
IMAGE_TOKENS = list(range(100, 108))
DEPTH = decoder_depth(layers=2, dim=64, ffn=128, head_dim=16, width=256)  # reductions up to 256 positions deep


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to fp32 round-off of the two implementations' sums (SDPA vs eager softmax, fused products)."""
    torch.testing.assert_close(actual, expected, **roundoff_tolerance(expected, DEPTH))


def tiny_hf(swin_norm: bool = False, seed: int = 0, shared_norm_groups: int | None = None):
    """A random transformers Chameleon (hidden 64, 2 layers, 4 heads, vocab 512) with a toy VQ model.

    `shared_norm_groups` G makes q/k norm rows equal within groups of HEADS / G consecutive heads, the
    structure Lumina's (model_parallel_size, head_dim) checkpoints encode.
    """
    vocabulary = {"<image>": 5, **{f"IMGIMG{chr(ord('A') + i)}Z": token for i, token in enumerate(IMAGE_TOKENS)}}
    config = transformers.ChameleonConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, max_position_embeddings=256, swin_norm=swin_norm, vocabulary_map=vocabulary,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        vq_config={"embed_dim": 8, "num_embeddings": 16, "latent_channels": 8, "resolution": 32,
                   "base_channels": 32, "channel_multiplier": [1, 2], "num_res_blocks": 1, "attn_resolutions": []},
        attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.ChameleonForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("model.vqmodel."):
                continue
            if "norm" in name and name.endswith("bias"):
                parameter.normal_(0.0, 0.3)
            elif "norm" in name:
                parameter.normal_(1.0, 0.3)
            else:
                parameter.normal_(0.0, 0.2)
            if shared_norm_groups and ("q_norm" in name or "k_norm" in name):
                rows = parameter[:: HEADS // shared_norm_groups].clone()
                parameter.copy_(rows.repeat_interleave(HEADS // shared_norm_groups, dim=0))
    return model


@torch.no_grad()
def hf_logits(model, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' logits without its image-token masking. (S, T) -> (S, T, V)."""
    hidden = model.model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
    return model.lm_head(hidden).float()


@pytest.fixture(scope="module", params=[False, True], ids=["prenorm", "swin_norm"])
def pair(request, tmp_path_factory):
    """(transformers model, ours loaded from its save_pretrained folder)."""
    hf = tiny_hf(swin_norm=request.param)
    folder = tmp_path_factory.mktemp("chameleon")
    hf.save_pretrained(folder)
    ours = load_chameleon_lm(folder, dtype=torch.float32)
    assert ours.config.swin_norm is request.param
    return hf, ours


def random_tokens(shape, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def arange_positions(batch: int, length: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + length).expand(batch, -1)


# ---- whole-sequence forward ---------------------------------------------------------------------

@torch.no_grad()
def test_forward_matches_transformers(pair):
    hf, ours = pair
    ids = random_tokens((2, 12))
    for start in (0, 37):  # a uniform shift leaves RoPE attention unchanged
        positions = arange_positions(2, 12, start)
        expected = hf_logits(hf, ids, positions)
        logits = ours(ids, positions)
        assert logits.dtype == torch.float32 and logits.shape == (2, 12, VOCAB)
        close(logits, expected)
    gapped = torch.cat([torch.arange(6), torch.arange(20, 26)]).expand(2, -1)  # relative distances change
    assert (ours(ids, gapped)[:, 6:] - ours(ids, arange_positions(2, 12))[:, 6:]).abs().max() > 1e-2


@torch.no_grad()
def test_image_token_logits_are_not_masked(pair):
    hf, ours = pair
    ids = random_tokens((2, 8), seed=2)
    masked = hf(input_ids=ids).logits.float()  # transformers sets image-token columns to finfo.min
    logits = ours(ids, arange_positions(2, 8))
    text = [token for token in range(VOCAB) if token not in IMAGE_TOKENS]
    close(logits[..., text], masked[..., text])
    assert (masked[..., IMAGE_TOKENS] == torch.finfo(torch.float32).min).all()
    assert logits[..., IMAGE_TOKENS].abs().max() < 1e3 and logits[..., IMAGE_TOKENS].std() > 0.1


def test_custom_masks_per_layer_change_logits(pair):
    _, ours = pair
    ids, positions = random_tokens((2, 6)), arange_positions(2, 6)
    causal = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, HEADS, 6, 6)
    with torch.no_grad():
        close(ours(ids, positions, [causal, causal]), ours(ids, positions))
        hidden = causal.clone()
        hidden[:, :, 5, 2] = False
        changed = ours(ids, positions, hidden)
    close(changed[:, :5], ours(ids, positions)[:, :5])
    assert (changed[:, 5] - ours(ids, positions)[:, 5]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="3 attention masks for 2 layers"):
        ours(ids, positions, [causal] * 3)


# ---- cached path ----------------------------------------------------------------------------------

@torch.no_grad()
def test_prefill_and_decode_match_the_full_forward(pair):
    hf, ours = pair
    prefix, layout = 4, TokenLayout(prefix_len=4, rows=2, line_len=3)
    ids = random_tokens((3, prefix + layout.num_visual), seed=3)
    expected = hf_logits(hf, ids)
    stepper = Stepper(ours)
    cache = stepper.new_cache(Full(), layout.num_visual, 3, layout)
    steps = [stepper.prefill(TextPrefix(ids[:, :prefix], arange_positions(3, prefix), None), cache)]
    for index in range(layout.num_visual - 1):
        position = torch.full((3,), prefix + index)
        steps.append(stepper.decode(ids[:, prefix + index], index, cache, position))
    close(torch.stack(steps, 1), expected[:, prefix - 1 : -1])
    assert (cache.state.occupancy == prefix + layout.num_visual - 1).all()


@torch.no_grad()
def test_left_padded_prompts_equal_each_prompt_alone(pair):
    hf, ours = pair
    lengths, padded, layout = (5, 3), 5, TokenLayout(prefix_len=5, rows=2, line_len=3)
    prompts = [random_tokens((1, length), seed=10 + length)[0] for length in lengths]
    generated = random_tokens((2, layout.num_visual), seed=4)
    ids = torch.zeros(2, padded, dtype=torch.long)
    present = torch.zeros(2, padded, dtype=torch.bool)
    positions = torch.zeros(2, padded, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, padded - len(prompt):] = prompt
        present[row, padded - len(prompt):] = True
        positions[row, padded - len(prompt):] = torch.arange(len(prompt))  # real tokens start at 0
    ids[1, :2] = 7  # padding content must not matter
    stepper = Stepper(ours)
    cache = stepper.new_cache(Full(), layout.num_visual, 2, layout)
    steps = [stepper.prefill(TextPrefix(ids, positions, present), cache)]
    for index in range(layout.num_visual - 1):
        steps.append(stepper.decode(generated[:, index], index, cache, torch.tensor(lengths) + index))
    steps = torch.stack(steps, 1)
    assert torch.isfinite(steps).all()
    for row, prompt in enumerate(prompts):
        alone = torch.cat([prompt, generated[row, :-1]])[None]
        expected = hf_logits(hf, alone)[0, len(prompt) - 1 :]
        close(steps[row], expected)


@pytest.mark.parametrize("name", CACHE_CONFIGS)
@torch.no_grad()
def test_every_policy_equals_the_forward_with_evicted_tokens_masked(pair, policy_factory, name):
    """With left padding, a policy's logits equal the forward whose mask hides padding and evicted slots."""
    _, ours = pair
    layout, sequences = TokenLayout(prefix_len=3, rows=6, line_len=4), 2
    total = layout.prefix_len + layout.num_visual - 1
    ids = random_tokens((sequences, total), seed=5)
    present = torch.tensor([[True, True, True], [False, True, True]])
    positions = (torch.arange(total) - (~present).sum(1, keepdim=True)).clamp(min=0)  # (S, T)
    budget = layout.num_visual if name == "full" else parse_keep("1/2").budget(layout.num_visual)
    stepper = Stepper(ours)
    cache = stepper.new_cache(policy_factory(name), budget, sequences, layout)
    steps = [stepper.prefill(TextPrefix(ids[:, :3], positions[:, :3], present), cache)]
    visible = []
    for index in range(layout.num_visual - 1):
        before = cache.visible_positions()  # [layer] (S, H, P + N) before this step's token is written
        token = layout.prefix_len + index
        steps.append(stepper.decode(ids[:, token], index, cache, positions[:, token]))
        visible.append([layer_map[..., :total].clone().index_fill_(-1, torch.tensor(token), True)
                        for layer_map in before])
    masks = []
    for layer in range(len(ours.model.layers)):
        prefix_mask = torch.ones(3, total, dtype=torch.bool).tril()[None, None].repeat(sequences, HEADS, 1, 1)
        prefix_mask[:, :, :, :3] &= present[:, None, None, :] | torch.eye(3, dtype=torch.bool)
        decode_rows = torch.stack([step[layer] for step in visible], dim=2)  # (S, H, N - 1, T)
        masks.append(torch.cat([prefix_mask, decode_rows], dim=2))
    oracle = ours(ids, positions, masks)[:, layout.prefix_len - 1 :]
    close(torch.stack(steps, 1), oracle)
    assert not any(mask[1, :, 3:, 0].any() for mask in masks)  # the padding slot was never visible
    if name != "full":
        unpadded = ours(ids[:1], positions[:1])[0, 2:]  # sequence 0 has no padding: only eviction differs
        assert cache.state.evictions > 0 and (torch.stack(steps, 1)[0] - unpadded).abs().max() > 1e-3


# ---- checkpoints ----------------------------------------------------------------------------------

def saved_state(hf) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone().contiguous() for key, value in hf.state_dict().items()}


@pytest.mark.parametrize("groups", [1, 2])
@torch.no_grad()
def test_lumina_qk_norm_layout_is_expanded_per_head(tmp_path, groups):
    """Lumina's files store q/k norms as (model_parallel_size, head_dim); 7B has one row for all heads."""
    hf = tiny_hf(seed=3, shared_norm_groups=groups)
    state = saved_state(hf)
    for key in [key for key in state if ".q_norm." in key or ".k_norm." in key]:
        state[key] = state[key][:: HEADS // groups].clone()
        assert state[key].shape == (groups, 16)
    save_file(state, tmp_path / "model.safetensors")
    hf.config.to_json_file(tmp_path / "config.json")
    ours = load_chameleon_lm(tmp_path, dtype=torch.float32)
    ids = random_tokens((2, 9))
    close(ours(ids, arange_positions(2, 9)), hf_logits(hf, ids))


@torch.no_grad()
def test_sharded_checkpoint_and_explicit_config(tmp_path):
    hf = tiny_hf(seed=4)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config = ChameleonLMConfig.from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    ours = load_chameleon_lm(tmp_path / "model.safetensors.index.json", config, dtype=torch.float32)
    ids = random_tokens((1, 7))
    close(ours(ids, arange_positions(1, 7)), hf_logits(hf, ids))


def test_checkpoint_keys_are_the_hf_names_and_vqmodel_is_skipped(tmp_path):
    hf = tiny_hf(seed=5)
    hf.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    ours = load_chameleon_lm(tmp_path, dtype=torch.float32)
    language = {key for key in stored if not key.startswith("model.vqmodel.")}
    assert set(ours.state_dict()) == language and len(stored) > len(language)
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_norm.bias", "model.norm.weight",
                 "model.layers.0.mlp.gate_proj.weight", "model.layers.0.post_attention_layernorm.weight",
                 "lm_head.weight"):
        assert torch.equal(ours.state_dict()[name], stored[name])


def test_missing_and_mismatched_keys_raise_checkpoint_error(tmp_path):
    hf = tiny_hf(seed=6)
    state = saved_state(hf)
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 64)
    state["model.layers.0.self_attn.q_norm.weight"] = torch.zeros(3, 16)  # 3 groups cannot split 4 heads
    state["model.extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    hf.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(CheckpointError) as error:
        load_chameleon_lm(tmp_path, dtype=torch.float32)
    message = str(error.value)
    for key in ("model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight",
                "model.layers.0.self_attn.q_norm.weight", "model.extra.weight", str(tmp_path)):
        assert key in message
    assert "vqmodel" not in message


def test_missing_checkpoint_files_are_named(tmp_path):
    with pytest.raises(MissingWeightsError, match="model.safetensors"):
        load_chameleon_lm(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard-2.safetensors"}}))
    with pytest.raises(MissingWeightsError, match="shard-2.safetensors"):
        load_chameleon_lm(tmp_path)


# ---- config and numerics --------------------------------------------------------------------------

def test_config_from_lumina_style_and_transformers_5_dicts():
    lumina = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": 65536, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "rope_scaling": None, "max_position_embeddings": 4096, "swin_norm": False, "model_parallel_size": 1,
              "mask_image_logits": False, "z_loss_weight": 1e-5, "vq_config": {"ch": 128}}
    config = ChameleonLMConfig.from_hf_config(lumina)
    assert config == ChameleonLMConfig() and config.head_dim == 128
    modern = ChameleonLMConfig.from_hf_config({"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0,
                                                                   "factor": 2.0}, "hidden_size": 64,
                                               "num_attention_heads": 4, "num_key_value_heads": None})
    assert modern.rope_theta == 500.0 and modern.num_key_value_heads == 4
    base = ChameleonLMConfig(hidden_size=64, num_attention_heads=4, rope_theta=500.0).inverse_frequencies()
    torch.testing.assert_close(modern.inverse_frequencies(), base / 2)
    with pytest.raises(ValueError, match="grouped-query attention"):
        ChameleonLMConfig(num_key_value_heads=8)
    with pytest.raises(ValueError, match="rope scaling"):
        ChameleonLMConfig.from_hf_config({"rope_scaling": {"type": "dynamic", "factor": 2.0}})


def test_rope_frequencies_stay_fp32_under_bfloat16():
    model = ChameleonLM(ChameleonLMConfig(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=4, rope_theta=500.0))
    reference = model.inv_freq.clone()
    model = model.to(torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.inv_freq.dtype == torch.float32
    assert torch.equal(model.inv_freq, reference) and "inv_freq" not in model.state_dict()
    ids = torch.randint(0, 32, (1, 4))
    assert model(ids, arange_positions(1, 4, 3000)).dtype == torch.float32
