"""Every decoding method reaches the run on every model family: the record names the method that ran.

`decoding=sjd` on Janus-Pro used to run sequential decoding and exit 0 (the method was fixed when loading and
Janus's loader dropped it). Now the method is chosen per generation and no loader takes it: these tests run
the real runner on a tiny configuration of every `conf/model` option under every `conf/decoding` option.
"""

from __future__ import annotations

import inspect

import pytest
from hydra.utils import get_object

from conftest import MODEL_CONFIGS
from lineareval.compose import config_options
from lineareval.runner import run
from test_compile_readiness import TINY

DECODING_CONFIGS = config_options("decoding")
LLAMAGEN_TINY = ("model.n_layer=2", "model.n_head=4", "model.dim=64", "model.image_size=128", "model.vq.ch=32",
                 "model.vq.ch_mult=[1,1,1,1,1]", "model.vq.z_channels=32")


def family_of(make_config, model: str) -> str:
    target = make_config(f"model={model}").model._target_
    return {"lineareval.demo.load_demo": "demo", "lineareval.generators.llamagen.load_llamagen": "llamagen",
            "lineareval.generators.janus.load_janus": "janus", "lineareval.generators.lumina.load_lumina": "lumina"}[target]


def tiny(make_config, model: str) -> tuple[str, ...]:
    """Overrides that make `model` a tiny random network of its own family (the demo model is small already)."""
    family = family_of(make_config, model)
    if family == "demo":
        return ("model=demo", "num_samples=2")
    if family == "llamagen":
        return (f"model={model}", "weights=random", "num_samples=2", *LLAMAGEN_TINY)
    return (f"model={model}", "weights=random", "prompt=a red apple", "images_per_prompt=2", *TINY[family][1:])


def cases():
    """One configuration per family in the default suite (the first of each), every configuration when slow."""
    first = {"demo": "demo", "llamagen": "llamagen_tiny", "janus": "janus_pro_1b", "lumina": "lumina_mgpt_768"}
    for model in MODEL_CONFIGS:
        for decoding in DECODING_CONFIGS:
            marks = () if model in first.values() else (pytest.mark.slow,)
            yield pytest.param(model, decoding, id=f"{model}-{decoding}", marks=marks)


@pytest.mark.parametrize("model, decoding", list(cases()))
def test_the_record_names_the_decoding_method_that_ran(make_config, model, decoding):
    cfg = make_config(*tiny(make_config, model), f"decoding={decoding}", "cache=linear", "keep=1/2",
                      "sampling.top_k=1", "batch_size=2", "decode_images=false",
                      "benchmark=samples")
    record = run(cfg)
    assert record["decoding"]["name"] == decoding
    assert record["decoding"] == {"name": decoding, **{key: value for key, value in cfg.decoding.items()
                                                      if key not in ("_target_", "name")}}
    num_decoded = record["visual_budget"] * 2 - 1  # keep=1/2: B = N / 2
    if decoding == "sequential":
        assert record["tokens_per_pass"] == 1.0 and record["decode_passes_per_image"] == num_decoded
    elif model == "demo":  # trained: greedy Jacobi iterations commit several tokens per forward pass
        assert record["tokens_per_pass"] > 1 and record["decode_passes_per_image"] < num_decoded
    else:  # random weights: greedy drafts are accepted only by chance (the old "> 1" held by one token of 63 on
        # llamagen_tiny), so check that windows of drafts were fed and that no pass was wasted
        assert record["tokens_fed_per_pass"] > 2 and record["decode_passes_per_image"] <= num_decoded


def test_no_family_loader_takes_a_decoding_method(make_config):
    """The method is an argument of `generate`, never of a loader (where one family silently dropped it)."""
    targets = {make_config(f"model={model}").model._target_ for model in MODEL_CONFIGS}
    for target in targets:
        assert "decoding" not in inspect.signature(get_object(target)).parameters, target
