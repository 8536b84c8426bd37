"""Lumina-mGPT: the image layout, evictions right after new-line tokens, and every policy's oracle on
both the conditional cache and the separate unconditional cache (unbatched CFG)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lineareval.decoding.method import Sequential
from tokenizers.pre_tokenizers import ByteLevel

from conftest import CACHE_CONFIGS, decoder_depth, roundoff_tolerance
from lineareval.cache import TokenLayout
from lineareval.decoding.stepper import Stepper
from lineareval.generators.base import Generator
from lineareval.generators.lumina import LuminaFamily, LuminaTokens
from lineareval.models.layers import TextPrefix
from lineareval.models.chameleon import ChameleonLM, ChameleonLMConfig
from lineareval.models.llama import prefix_mask
from lineareval.keep import parse_keep
from lineareval.models.weights import MissingWeightsError
from lineareval.runner import run
from lineareval.sampling import SamplingConfig
from test_text_runs import lumina_folders  # noqa: F401 (a fixture)
from tokenizer_files import write_lumina_tokenizer

TOKENS = LuminaTokens(image_start=300, image_end=301, new_line=302, end_of_turn="<eot>", size_offset=310,
                      image_first=4, image_last=259)
PROMPTS = {"a red apple": [1, 20, 21, 22, 23], "two cats": [1, 24, 25]}


class StubTokenizer:
    bos_token_id, eos_token_id = 1, 2

    def __call__(self, texts, add_special_tokens=True):
        ids = [PROMPTS[text.split("\n")[1].removesuffix("<eot>")] for text in texts]
        return {"input_ids": ids if add_special_tokens else [row[1:] for row in ids]}


@pytest.fixture(scope="module")
def network() -> ChameleonLM:
    torch.manual_seed(0)
    model = ChameleonLM(ChameleonLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=512))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.3)
    return model.float().eval()


def adapter(network, resolution: int = 128, top_k: int = 50) -> Generator:
    family = LuminaFamily(StubTokenizer(), resolution, torch.device("cpu"), TOKENS)
    return Generator.assemble("lumina_tiny", network, family, SamplingConfig(4.0, -1, 1.0, top_k, 1.0), "random")


def test_layout_rows_end_with_new_line_and_linear_evicts_right_after_them(network, policy_factory):
    lumina = adapter(network)
    evictions = []
    generation = lumina.generate(["a red apple", "two cats"], torch.arange(2), policy_factory("linear"), 24, seed=1,
                                 method=Sequential(), observer=lambda index, cache: evictions.append(cache.state.evictions))
    tokens = generation.tokens
    assert lumina.layout.line_len == 9 and tokens.shape == (2, 72)
    rows = tokens.view(2, 8, 9)
    assert (rows[:, :, -1] == TOKENS.new_line).all()
    assert ((rows[:, :, :-1] >= TOKENS.image_first) & (rows[:, :, :-1] <= TOKENS.image_last)).all()
    grew = [index for index in range(1, len(evictions)) if evictions[index] > evictions[index - 1]]
    assert grew and all(tokens[0, index] == TOKENS.new_line for index in grew)  # the token just fed ended a row
    assert len(generation.caches) == 2 and all(cache.state.evictions > 0 for cache in generation.caches)
    header = lumina.family.image_header()
    assert header == [300, 310 + 4, 310 + 4]


def test_paper_budgets_at_keep_1_8():
    """keep=1/8 gives the paper's B = 294 (768 px, line 49) and 520 (1024 px, line 65)."""
    for resolution, line, budget in [(768, 49, 294), (1024, 65, 520)]:
        layout = LuminaFamily(None, resolution, torch.device("cpu")).layout
        assert layout.line_len == line and parse_keep("1/8").budget(layout.num_visual) == budget


def replay(network, ids, positions, present, tokens, policy, budget, line_len):
    """Cached logits (S, N, V) and the visibility of every decode step, feeding `tokens`."""
    rows, prefix = ids.shape
    layout = TokenLayout(prefix, tokens.shape[1] // line_len, line_len)
    stepper = Stepper(network)
    cache = stepper.new_cache(policy, budget, rows, layout)
    lengths = positions[:, -1] + 1
    logits, visible = [stepper.prefill(TextPrefix(ids, positions, present), cache)], []
    for index in range(tokens.shape[1] - 1):
        before = cache.visible_positions()
        logits.append(stepper.decode(tokens[:, index], index, cache, lengths + index))
        for layer_map in before:
            layer_map[..., prefix + index] = True
        visible.append(before)
    return torch.stack(logits, 1), visible, cache


@pytest.mark.parametrize("name", CACHE_CONFIGS)
def test_both_cfg_caches_equal_masked_full_attention(network, policy_factory, name):
    lumina = adapter(network)
    generation = lumina.generate(["a red apple", "two cats"], torch.arange(2), policy_factory(name), 72, seed=2, method=Sequential())
    tokens, budget = generation.tokens, 72 if name == "full" else 24
    cond_ids, cond_present = lumina.family.prefix_batch(["a red apple", "two cats"])
    header = torch.tensor(lumina.family.image_header()).expand(2, -1)
    contexts = {"cond": (cond_ids, (cond_present.cumsum(1) - 1).clamp(min=0), cond_present),
                "uncond": (header, torch.arange(3).expand(2, -1), torch.ones_like(header, dtype=torch.bool))}
    with torch.inference_mode():
        for ids, positions, present in contexts.values():
            cached, visible, cache = replay(network, ids, positions, present, tokens, policy_factory(name), budget, 9)
            prefix, length = ids.shape[1], ids.shape[1] + tokens.shape[1] - 1
            prefix_rows = torch.zeros(2, 4, prefix, length, dtype=torch.bool)
            prefix_rows[..., :prefix] = prefix_mask(present)
            masks = [torch.cat([prefix_rows] + [step[layer][..., None, :length] for step in visible], dim=2)
                     for layer in range(2)]
            all_ids = torch.cat([ids, tokens[:, :-1]], dim=1)
            all_positions = torch.cat([positions, positions[:, -1:] + 1 + torch.arange(tokens.shape[1] - 1)], dim=1)
            oracle = network(all_ids, all_positions, masks)[:, prefix - 1:]
            depth = decoder_depth(2, 64, 128, 16, length)
            torch.testing.assert_close(cached, oracle, **roundoff_tolerance(oracle, depth))
            if name != "full":
                assert cache.state.evictions > 0


def test_lumina_without_chameleon_files_names_them(make_config, tmp_path):
    with pytest.raises(MissingWeightsError) as error:
        run(make_config("model=lumina_mgpt_768", "prompt=a red apple"))
    message = str(error.value)
    for expected in ("vqgan.yaml", "vqgan.ckpt", "text_tokenizer.json", str(tmp_path / "weights" / "chameleon"),
                     "model.chameleon_dir"):
        assert expected in message


RANDOM_TINY = ("model=lumina_mgpt_768", "weights=random", "prompt=a red apple", "model.resolution=64",
               "model.lm.hidden_size=64", "model.lm.intermediate_size=128", "model.lm.num_hidden_layers=1",
               "model.lm.num_attention_heads=4", "model.lm.vocab_size=9000")


def test_random_lumina_without_decoder_refuses_to_decode_before_generating(make_config):
    with pytest.raises(FileNotFoundError, match="decode_images=false"):
        run(make_config(*RANDOM_TINY))
    record = run(make_config(*RANDOM_TINY, "decode_images=false", "cache=linear", "keep=1/2"))
    assert record["weights"] == "random" and record["visual_budget"] == 10  # 4 rows x (4 + 1) tokens, half kept


# ------------------------------------------------------------------------- files as users have them


def _chameleon_dir(tmp_path, source: Path, *names: str) -> Path:
    """A copy of some of the Chameleon tokenizer files of `source`."""
    folder = tmp_path / "chameleon"
    folder.mkdir()
    for name in names:
        shutil.copy(source / name, folder / name)
    return folder


def test_checkpoint_run_without_decoding_never_loads_the_vqgan(make_config, lumina_folders, tmp_path):
    model_dir, chameleon = lumina_folders
    folder = _chameleon_dir(tmp_path, chameleon, "text_tokenizer.json")
    (folder / "vqgan.ckpt").write_bytes(b"")  # unreadable: loading it would fail
    record = run(make_config("model=lumina_mgpt_768", f"model.path={model_dir}", f"model.chameleon_dir={folder}",
                             "model.resolution=64", "prompt=a red apple", "decode_images=false"))
    assert record["num_samples"] == 1 and record["weights"] == "checkpoint"


def test_vqgan_safetensors_alone_is_enough_to_decode(make_config, lumina_folders, tmp_path):
    from lineareval.models.convert import convert_vqgan

    model_dir, chameleon = lumina_folders
    folder = _chameleon_dir(tmp_path, chameleon, "text_tokenizer.json", "vqgan.yaml")
    convert_vqgan(chameleon / "vqgan.ckpt", folder / "vqgan.safetensors")
    cfg = make_config("model=lumina_mgpt_768", f"model.path={model_dir}", f"model.chameleon_dir={folder}",
                      "model.resolution=64", "prompt=a red apple")
    run(cfg)
    assert np.load(Path(cfg.run_dir) / "samples.npz")["arr_0"].shape == (1, 8, 8, 3)


def _tokenizer_adapter(network, folder: Path) -> LuminaFamily:
    from transformers import AutoTokenizer

    return LuminaFamily(AutoTokenizer.from_pretrained(folder), 128, torch.device("cpu"))


@pytest.mark.parametrize("post_bos", [False, True], ids=["tokenizer-adds-nothing", "tokenizer-adds-bos"])
def test_prompt_is_bos_then_text_without_special_tokens(network, tmp_path, post_bos):
    """Official: [bos] + encode(text + "<reserved08706>", add_special_tokens=False), whatever the tokenizer adds."""
    lumina = _tokenizer_adapter(network, write_lumina_tokenizer(tmp_path / "tok", post_bos=post_bos))
    ids, present = lumina.prefix_batch(["a café"])
    text = "Generate an image of 128x128 according to the following prompt:\na café"
    alphabet = sorted(ByteLevel.alphabet())  # one id per byte symbol, from 8720 (tokenizer_files)
    body = [8720 + alphabet.index(symbol) for piece, _ in ByteLevel(add_prefix_space=False).pre_tokenize_str(text)
            for symbol in piece]
    assert ids[0].tolist() == [0, *body, 8710, 8197, 8804 + 4, 8804 + 4]  # BOS once, no EOS, then the header
    assert bool(present.all())


RANDOM_FROM_FILES = dict(name="lumina", resolution=64, sampling={"cfg_scale": 4.0, "cfg_interval": -1,
                         "temperature": 1.0, "top_k": 50, "top_p": 1.0}, weights="random", device="cpu",
                         dtype=torch.float32, lm=dict(vocab_size=9000, hidden_size=64, intermediate_size=128,
                                                      num_hidden_layers=1, num_attention_heads=4))


def test_tokenizer_that_drops_spaces_stops_with_the_transformers_version(tmp_path):
    import transformers

    from lineareval.generators.lumina import load_lumina as build_lumina

    folder = write_lumina_tokenizer(tmp_path / "Lumina-tok", drop_spaces=True)
    with pytest.raises(ValueError) as error:
        build_lumina(path=str(folder), weights_dir=str(tmp_path), decode_images=False, **RANDOM_FROM_FILES)
    message = str(error.value)
    assert f"transformers {transformers.__version__}" in message and str(folder) in message
    assert "spaces" in message
    build_lumina(path=str(write_lumina_tokenizer(tmp_path / "ok")), weights_dir=str(tmp_path), decode_images=False,
                 **RANDOM_FROM_FILES)  # the same tokenizer without the defect loads


def test_layout_token_ids_are_checked_against_text_tokenizer_json(tmp_path, lumina_folders):
    from lineareval.generators.lumina import load_lumina as build_lumina

    _, chameleon = lumina_folders
    folder = _chameleon_dir(tmp_path, chameleon, "text_tokenizer.json")
    tokenizer = write_lumina_tokenizer(tmp_path / "tok")
    adapter = build_lumina(path=str(tokenizer), weights_dir=str(tmp_path), chameleon_dir=str(folder),
                           decode_images=False, **RANDOM_FROM_FILES)
    assert adapter.family.tokens == LuminaTokens()  # the released ids agree with the vocabulary
    document = json.loads((folder / "text_tokenizer.json").read_text())
    vocab = document["model"]["vocab"]
    vocab["<reserved08799>"], vocab["<reserved08802>"] = 8802, 8803  # a vocabulary that disagrees
    (folder / "text_tokenizer.json").write_text(json.dumps(document))
    with pytest.raises(ValueError) as error:
        build_lumina(path=str(tokenizer), weights_dir=str(tmp_path), chameleon_dir=str(folder), decode_images=False,
                     **RANDOM_FROM_FILES)
    message = str(error.value)
    assert "new_line" in message and "8803" in message and "8802" in message and "model.tokens.new_line" in message
    assert str(folder / "text_tokenizer.json") in message
