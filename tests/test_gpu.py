"""CUDA checks (marked `gpu`; skipped without a GPU): the engine's oracle on the device, and a bf16 run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import CACHE_CONFIGS, tiny_llamagen
from lineareval.runner import run
from test_cache import oracle_masks, run_policy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("name", CACHE_CONFIGS)
def test_policy_oracle_on_cuda(policy_factory, name):
    model = tiny_llamagen(grid=8).cuda()
    generator = torch.Generator().manual_seed(1)
    labels = torch.tensor([3, 7, 10, 10], device="cuda")
    tokens = torch.randint(0, model.config.vocab_size, (4, 64), generator=generator).cuda()
    budget = 64 if name == "full" else 21
    trace = run_policy(model, policy_factory(name), budget, labels, tokens)
    oracle = model(labels, tokens[:, :-1], oracle_masks(trace, 1))
    torch.testing.assert_close(trace.logits, oracle, rtol=1e-3, atol=1e-3)  # TF32/fused kernels on GPU


def test_bf16_run_on_cuda(make_config):
    cfg = make_config("weights=random", "device=cuda", "num_samples=4", "batch_size=4", "cache=linear", "keep=1/4")
    record = run(cfg)
    stored = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())
    assert stored == json.loads(json.dumps(record))
    assert record["dtype"] == "bfloat16" and record["peak_memory_method"] == "cuda_max_memory_allocated"
    assert record["device_name"].startswith("NVIDIA")
