"""Janus-Pro: parity with transformers' native Janus image generation, and every policy's oracle."""

from __future__ import annotations

import pytest
import torch

from lineareval.decoding.method import Sequential
from transformers import JanusConfig, JanusForConditionalGeneration

from conftest import CACHE_CONFIGS, decoder_depth, roundoff_tolerance
from lineareval.cache import ScoreNeed, TokenLayout
from lineareval.cache.full import Full
from lineareval.decoding.stepper import Stepper
from lineareval.generators.base import Generator
from lineareval.generators.janus import JanusFamily
from lineareval.models.layers import TextPrefix
from lineareval.models.checkpoint import CheckpointError
from lineareval.models.janus import load_janus_networks as load_janus
from lineareval.models.llama import prefix_mask
from lineareval.sampling import SamplingConfig

BOS, BOI, PAD = 1, 2, 0
PROMPTS = {"a red apple": [1, 5, 6, 7, 2], "two cats on a long sofa": [1, 8, 9, 10, 11, 12, 13, 2]}


class StubTokenizer:
    """Maps the test prompts (after formatting) to fixed ids, like a real tokenizer call (BOS only if asked)."""

    pad_token_id, bos_token_id = PAD, BOS

    def __call__(self, texts, add_special_tokens=True):
        ids = [PROMPTS[text.split(": ", 1)[1].split("\n")[0]] for text in texts]
        return {"input_ids": ids if add_special_tokens else [row[1:] for row in ids]}


def tiny_config(patches: int) -> JanusConfig:
    return JanusConfig(
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=300, max_position_embeddings=512),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           image_size=16 * patches, patch_size=16, num_image_tokens=patches**2, projection_dim=64),
        vq_config=dict(embed_dim=8, num_embeddings=64, base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1,
                       latent_channels=32, num_patches=patches, projection_dim=64, image_token_embed_dim=64),
        image_token_id=299)


@pytest.fixture(scope="module")
def janus(tmp_path_factory):
    """A tiny random transformers Janus saved in its own format, and our port loaded from that folder."""
    torch.manual_seed(0)
    reference = JanusForConditionalGeneration(tiny_config(patches=6)).eval()
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if parameter.dim() > 1 and ("language_model" in name or "generation" in name):
                parameter.normal_(0.0, 0.3)  # far from uniform attention, so eviction changes outputs
    reference.generation_config.bos_token_id, reference.generation_config.pad_token_id = BOS, PAD
    reference.generation_config.generation_kwargs = {"boi_token_id": BOI}
    folder = tmp_path_factory.mktemp("janus")
    reference.save_pretrained(folder)
    network, vqmodel = load_janus(folder)
    return reference, network, vqmodel, folder


def adapter(janus, top_k: int = 1, cfg_scale: float = 5.0) -> Generator:
    _, network, vqmodel, _ = janus
    family = JanusFamily(StubTokenizer(), vqmodel, network.gen_config.num_patches, torch.device("cpu"))
    return Generator.assemble("janus_tiny", network, family, SamplingConfig(cfg_scale, -1, 1.0, top_k, 1.0),
                              "checkpoint")


@pytest.mark.parametrize("prompts", [["a red apple", "a red apple"], ["a red apple", "two cats on a long sofa"]],
                         ids=["same-prompt", "padded-prompts"])
def test_greedy_generation_equals_transformers(janus, prompts):
    reference = janus[0]
    ids, present = adapter(janus).family.prefix_batch(prompts)
    batch = len(prompts)
    expected = reference.generate(ids[:batch], attention_mask=present[:batch].long(), generation_mode="image",
                                  do_sample=False, guidance_scale=5.0)
    ours = adapter(janus).generate(prompts, torch.arange(batch), Full(), 36, seed=0, method=Sequential()).tokens
    assert torch.equal(ours, expected)
    assert expected.unique().numel() > 3  # the test is not about a constant sequence


def test_images_decode_with_the_checkpoint_vq(janus):
    reference = janus[0]
    tokens = torch.randint(0, 64, (2, 36))
    images = adapter(janus).decode_images(tokens)
    expected = reference.model.vqmodel.decode(tokens)
    side = 6 * 2  # 6 x 6 codes, channel_multiplier [1, 1]: one 2x upsampling
    assert images.dtype == torch.uint8 and images.shape == (2, side, side, 3)
    assert torch.equal(images, torch.clamp((expected + 1) / 2 * 255, 0, 255).permute(0, 2, 3, 1).to(torch.uint8))


@pytest.mark.parametrize("name", CACHE_CONFIGS)
def test_policy_equals_masked_full_attention(janus, policy_factory, name):
    """Oracle with padded prompts and [cond; uncond] rows: cached logits == forward with evicted tokens masked."""
    runner = adapter(janus, top_k=0)
    network, model = runner.model, runner.model.language_model
    ids, present = runner.family.prefix_batch(["a red apple", "two cats on a long sofa"])
    rows, prefix, num_visual = ids.shape[0], ids.shape[1], runner.layout.num_visual
    tokens = torch.randint(0, 64, (rows, num_visual), generator=torch.Generator().manual_seed(2))
    layout = TokenLayout(prefix, runner.layout.rows, runner.layout.line_len)
    stepper = Stepper(network)
    cache = stepper.new_cache(policy_factory(name), num_visual if name == "full" else 14, rows, layout)
    lengths, prefix_positions = present.sum(1), (present.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = [stepper.prefill(TextPrefix(ids, prefix_positions, present), cache)]  # the image head's logits
        visible = []
        for index in range(num_visual - 1):
            before = cache.visible_positions()
            logits.append(stepper.decode(tokens[:, index], index, cache, lengths + index))
            for layer_map in before:
                layer_map[..., prefix + index] = True
            visible.append(before)
        length = prefix + num_visual - 1
        heads = model.config.num_attention_heads
        prefix_rows = torch.zeros(rows, heads, prefix, length, dtype=torch.bool)
        prefix_rows[..., :prefix] = prefix_mask(present)
        masks = [torch.cat([prefix_rows] + [step[layer][..., None, :length] for step in visible], dim=2)
                 for layer in range(len(model.layers))]
        embeds = torch.cat([network.embed_text(ids), network.embed_image(tokens[:, :-1])], dim=1)
        positions = torch.cat([prefix_positions, lengths[:, None] + torch.arange(num_visual - 1)], dim=1)
        oracle = network.image_logits(model(embeds, positions, masks)[:, prefix - 1:])
    depth = decoder_depth(len(model.layers), model.config.hidden_size, model.config.intermediate_size,
                          model.config.head_dim, length, head_input=network.gen_config.projection_dim * 2)
    torch.testing.assert_close(torch.stack(logits, 1), oracle, **roundoff_tolerance(oracle, depth))
    if name != "full":
        assert cache.state.evictions > 0
    if cache.policy.needs_scores is not ScoreNeed.NEVER:  # score-based: each row chooses for itself
        assert not torch.equal(visible[-1][0][0], visible[-1][0][2]), "cond and uncond rows chose alike"


def test_non_native_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "multi_modality", "language_config": {}}')
    with pytest.raises(CheckpointError, match="deepseek-community/Janus-Pro"):
        load_janus(tmp_path)
