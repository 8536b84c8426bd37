"""Shared fixtures: the real Hydra config composed with test overrides, and tiny random LlamaGens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import initialize_config_dir
from omegaconf import DictConfig

from lineareval.compose import compose_config, config_options, policy_names
from lineareval.cache.allocation import Budgets, allocate
from lineareval.identity import register_resolvers
from lineareval.models.llamagen import LlamaGen, LlamaGenConfig
from lineareval.factory import build_policy

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
TEST_CONF_DIR = Path(__file__).resolve().parent / "conf"  # test-only options (a Hydra search path)
SHIPPED_POLICIES = policy_names()  # every policy of conf/cache/, as Hydra lists the group
# ... and the test-only ones: a policy that keeps the oldest tokens (tests/oldest_policy.py) runs every
# policy-parametrised test, as any policy a user writes must
CACHE_CONFIGS = SHIPPED_POLICIES + ["oldest"]
# every budget allocation of conf/budget_allocation/, the default (uniform) first; adaptive_heads' dense layout is
# tested against the packed one bit for bit (tests/test_allocation.py), which every parametrised test runs
ALLOCATION_CONFIGS = sorted((name for name in config_options("budget_allocation") if name != "adaptive_heads_dense"),
                            key=lambda name: (name != "uniform", name))
MODEL_CONFIGS = sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml"))


@pytest.fixture
def make_config(tmp_path, monkeypatch):
    """Compose conf/config.yaml with overrides; CPU, llamagen_tiny unless overridden, outputs under tmp_path,
    hub offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    register_resolvers()

    def _compose(*overrides: str) -> DictConfig:
        # the tiny random LlamaGen unless a test names a model (run.py's default is the trained demo model)
        model = [] if any(override.startswith("model=") for override in overrides) else ["model=llamagen_tiny"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return compose_config(f"hydra.searchpath=[file://{TEST_CONF_DIR}]", f"output_root={tmp_path / 'outputs'}",
                                  "device=cpu", f"weights_dir={tmp_path / 'weights'}", *model, *overrides)

    return _compose


@pytest.fixture
def policy_factory(make_config):
    """A policy built from conf/cache/<name>.yaml with optional overrides, as the runner builds it."""
    return lambda name, *overrides: build_policy(make_config(f"cache={name}", *overrides).cache)


@pytest.fixture
def budgets_for(make_config):
    """`Budgets` of conf/budget_allocation/<allocation>.yaml for `policy` at visual budget `budget` on `model`,
    as the runner allocates them."""
    def build(policy, budget: int, allocation: str, model) -> Budgets:
        spec = model.cache_spec()
        return allocate(make_config(f"budget_allocation={allocation}").budget_allocation, budget,
                        layers=spec["num_layers"], heads=spec["heads"], layout=model.layout, policy=policy,
                        model="tiny")

    return build


def roundoff_tolerance(reference: torch.Tensor, depth: int) -> dict:
    """`assert_close` tolerances for two evaluations of one floating-point computation that differ only in
    the order of their sums (another kernel, library, compiler or CPU: MKL picks other kernels on AMD).

    Each evaluation lies within depth * u * M of the exact result: Higham's worst-case bound for a sum
    of n terms is n * u times the terms' magnitude (u = eps / 2, the unit roundoff of the dtype),
    and chained products add their reduction lengths (`depth`, see `decoder_depth`); M is the largest
    magnitude of the result. The two evaluations are then at most twice that apart. rtol is 0: a
    near-zero result still carries the absolute error of its large terms. The bound is worst-case
    (errors of random sign grow like sqrt(depth)), so it holds on any IEEE machine, and it stays far
    below the differences a wrong computation makes (a stale weight, a token that should be masked).
    """
    unit_roundoff = torch.finfo(reference.dtype).eps / 2
    return {"rtol": 0.0, "atol": 2 * depth * unit_roundoff * float(reference.detach().abs().max())}


def decoder_depth(layers: int, dim: int, ffn: int, head_dim: int, width: int, head_input: int | None = None) -> int:
    """Reduction lengths chained from the input to the logits of a Llama-style decoder: per layer the q/k/v,
    output and gate/up projections (dim each), q.k (head_dim), the attention-weighted sum (width keys)
    and the down projection (ffn); then the output head (`head_input`, default dim)."""
    return layers * (3 * dim + head_dim + width + ffn) + (head_input or dim)


def llamagen_depth(model: LlamaGen) -> int:
    """`decoder_depth` of a LlamaGen GPT attending over its whole sequence."""
    config = model.config
    return decoder_depth(config.n_layer, config.dim, config.ffn_hidden, config.head_dim,
                         config.cls_token_num + model.layout.num_visual)


def tiny_llamagen(grid: int = 8, layers: int = 2, heads: int = 4, dim: int = 64, vocab: int = 256,
                  seed: int = 0, std: float = 0.2) -> LlamaGen:
    """A random LlamaGen with a grid x grid layout; large init std so attention is far from uniform."""
    torch.manual_seed(seed)
    model = LlamaGen(LlamaGenConfig(dim=dim, n_layer=layers, n_head=heads, vocab_size=vocab, num_classes=10,
                                    image_size=16 * grid, downsample_size=16))
    for name, parameter in model.named_parameters():
        if parameter.dim() > 1:
            parameter.data.normal_(0.0, std)
    return model.eval()


@pytest.fixture(scope="session")
def janus_folder(tmp_path_factory) -> Path:
    """A tiny transformers-native Janus folder with a tokenizer in DeepSeek's layout (byte-level BPE), as on the hub."""
    from transformers import JanusForConditionalGeneration

    from test_janus import tiny_config
    from tokenizer_files import write_janus_tokenizer

    folder = tmp_path_factory.mktemp("Janus-tiny")
    torch.manual_seed(0)
    JanusForConditionalGeneration(tiny_config(patches=6)).save_pretrained(folder)
    write_janus_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_file(tmp_path_factory) -> Path:
    """A tiny random OpenAI CLIP saved as a safetensors state dict (no download)."""
    from clip.model import CLIP
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = CLIP(embed_dim=16, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, path)
    return path


@pytest.fixture
def reference_for_collect(tmp_path) -> Path:
    """A 64 px ADM-layout reference batch and a tiny extractor registered as 'tiny-collect'."""
    import numpy as np

    from lineareval.metrics.features import ExtractorSpec, register_extractor
    from test_fid import TinyExtractor

    register_extractor(ExtractorSpec("tiny-collect", TinyExtractor, "pool", protocol="tiny v1"))
    path = tmp_path / "reference.npz"
    np.savez(path, arr_0=np.random.default_rng(0).integers(0, 256, (32, 64, 64, 3), dtype=np.uint8))
    return path


@pytest.fixture(scope="module")
def setup():
    """A tiny random LlamaGen, two conditional and two null-class rows (as in CFG), and random tokens to
    teacher-force through it (the policy tests' shared inputs)."""
    model = tiny_llamagen(grid=8)
    labels = torch.tensor([3, 7, 10, 10])
    tokens = torch.randint(0, model.config.vocab_size, (4, model.layout.num_visual),
                           generator=torch.Generator().manual_seed(1))
    return model, labels, tokens


class WithMethod:
    """A generator whose `generate` decodes with a fixed `method` (tests that compare methods on one model)."""

    def __init__(self, generator, method):
        self.generator, self.method = generator, method

    def generate(self, *args, **kwargs):
        return self.generator.generate(*args, method=self.method, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.generator, name)
