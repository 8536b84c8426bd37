"""benchmark=efficiency: every policy on the same batch in one process, ratios against full."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from omegaconf import OmegaConf

from conftest import SHIPPED_POLICIES
from lineareval.cache import TokenLayout
from lineareval.runner import run
from test_compile_readiness import TINY as TINY_TEXT


def test_efficiency_table_has_every_policy_and_ratios(make_config):
    cfg = make_config("benchmark=efficiency", "weights=random", "batch_size=2", "model.image_size=128",
                      "benchmark.keeps=[1/4,1/2]", "benchmark.warmup=0")
    record = run(cfg)
    rows = {(row["cache"], row["keep"]): row for row in record["rows"]}
    expected = {("full", "1")} | {(name, keep) for name in SHIPPED_POLICIES if name != "full" for keep in ("1/4", "1/2")}
    assert set(rows) == expected
    assert rows["full", "1"]["speedup"] == 1.0 and rows["full", "1"]["visual_budget"] == 64
    for (name, keep), row in rows.items():
        assert row["batch_size"] == 2 and row["sequences"] == 4 and row["generation_s"] > 0
        assert row["speedup"] == rows["full", "1"]["generation_s"] / row["generation_s"]
        if name != "full":
            assert row["kv_cache_capacity_bytes"] < rows["full", "1"]["kv_cache_capacity_bytes"]
            assert row["visual_budget"] == {"1/4": 16, "1/2": 32}[keep]
    table = pd.read_csv(Path(cfg.run_dir) / "efficiency.csv")
    assert len(table) == len(expected) and set(table.device_name) == {record["device_name"]}
    assert not table["compile"].any() and (table.warmup_s < 0.01).all()  # warmup=0: nothing ran untimed
    for row in rows.values():  # CPU: the peak is the RSS increase, all of it per image; the process already holds
        assert row["memory_per_image_bytes"] == max(row["peak_memory_bytes"], 1) / 2 and row["resident_bytes"] > 0
        assert row["max_batch_at_limit"] == (16 * 2**30 - row["resident_bytes"]) // row["memory_per_image_bytes"]
    assert json.loads((Path(cfg.run_dir) / "metrics.json").read_text())["rows"] == json.loads(json.dumps(record["rows"]))
    assert run(cfg) == json.loads(json.dumps(record))  # finished: skipped on rerun


def test_step_latency_has_every_decode_step_of_every_timed_run(make_config):
    cfg = make_config("benchmark=efficiency", "weights=random", "batch_size=2", "model.image_size=128",
                      "benchmark.keeps=[1/4]", "benchmark.warmup=0", "benchmark.policies=[full,linear]")
    record = run(cfg)
    steps = pd.read_csv(Path(cfg.run_dir) / "step_latency.csv", dtype={"keep": str})
    assert list(steps.columns) == ["model", "cache", "keep", "batch_size", "step", "seconds", "decoding",
                                   "budget_allocation"]
    num_visual = 64  # 128 px: 8 x 8 tokens; steps 0..62 feed tokens 0..62 (the last token is only sampled)
    for row in record["rows"]:
        mine = steps[(steps.cache == row["cache"]) & (steps.keep == row["keep"])]
        assert list(mine.step) == list(range(num_visual - 1)) and (mine.batch_size == 2).all()
        assert (mine.seconds > 0).all() and set(mine.model) == {"llamagen_tiny"}
        # the steps lie inside the timed generation, which adds only the cache allocation and the prefill
        assert 0.5 * row["generation_s"] < mine.seconds.sum() < row["generation_s"]
        assert row["step_s_line5"] == pytest.approx(mine.seconds.iloc[32:40].mean())
        assert row["step_s_last_line"] == pytest.approx(mine.seconds.iloc[-7:].mean())


def test_repeated_timings_report_medians(make_config, monkeypatch):
    """benchmark.repeats=3: latency and every step's time are the medians of three timed generations."""
    from lineareval.benchmarks import efficiency

    totals = iter([3.0, 1.0, 2.0])  # the timed generations' wall times, in order
    real = efficiency.StepTimer

    class FakeTimer(real):
        """Steps of the k-th timed run take k + step/100 seconds (k = 1, 2, 3 in run order)."""
        runs = 0

        def __init__(self, steps, device):
            super().__init__(steps, device)
            FakeTimer.runs += 1
            self.run = FakeTimer.runs

        def seconds(self):
            return [self.run + step / 100 for step in range(len(super().seconds()))]

    def fake_generation(generator, policy, budget, conditions, ids, seed, device, *method):
        tokens, cost = real_generation(generator, policy, budget, conditions, ids, seed, device, *method)
        return tokens, {**cost, "generation_s": next(totals)}

    real_generation = efficiency.timed_generation
    monkeypatch.setattr(efficiency, "StepTimer", FakeTimer)
    monkeypatch.setattr(efficiency, "timed_generation", fake_generation)
    cfg = make_config("benchmark=efficiency", "weights=random", "batch_size=2", "model.image_size=128",
                      "benchmark.warmup=0", "benchmark.repeats=3", "benchmark.policies=[full]")
    (row,) = run(cfg)["rows"]
    assert (row["repeats"], row["generation_s"], row["generation_s_spread"]) == (3, 2.0, 1.0)
    steps = pd.read_csv(Path(cfg.run_dir) / "step_latency.csv")
    assert steps.seconds.tolist() == pytest.approx([2 + step / 100 for step in range(63)])  # the middle run's
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        efficiency.Efficiency(repeats=0)


@pytest.mark.parametrize("order", ["interleaved", "grouped"])
def test_timed_runs_take_turns_across_policies(make_config, monkeypatch, order):
    """interleaved: all warm-ups, then rounds that time every entry once (each round starts one later)."""
    from lineareval.benchmarks import efficiency

    calls, real_generation = [], efficiency.timed_generation

    def logged_generation(generator, policy, budget, conditions, ids, seed, device, *method):
        calls.append((policy.name, budget.visual_budget, "timed" if isinstance(generator, efficiency.WithTimer)
                      else "warm-up"))
        return real_generation(generator, policy, budget, conditions, ids, seed, device, *method)

    monkeypatch.setattr(efficiency, "timed_generation", logged_generation)
    cfg = make_config("benchmark=efficiency", "weights=random", "batch_size=1", "model.image_size=64",
                      "benchmark.policies=[full,window]", "benchmark.keeps=[1/4,1/2]", "benchmark.repeats=3",
                      f"benchmark.order={order}")
    record = run(cfg)
    full, quarter, half = ("full", 16, "warm-up"), ("window", 4, "warm-up"), ("window", 8, "warm-up")
    timed = [entry[:2] + ("timed",) for entry in (full, quarter, half)]
    if order == "interleaved":
        assert calls == [full, quarter, half, *timed, *timed[1:], timed[0], timed[2], *timed[:2]]
    else:
        assert calls == [full, *[timed[0]] * 3, quarter, *[timed[1]] * 3, half, *[timed[2]] * 3]
    assert [row["order"] for row in record["rows"]] == [order] * 3
    assert [row["repeats"] for row in record["rows"]] == [3] * 3


def test_compiled_runs_on_cuda_are_grouped_and_orders_are_checked():
    from types import SimpleNamespace

    from lineareval.benchmarks.efficiency import Efficiency

    assert not Efficiency().interleaved(SimpleNamespace(compile=True), torch.device("cuda"))
    assert Efficiency().interleaved(SimpleNamespace(compile=False), torch.device("cuda"))
    assert Efficiency().interleaved(SimpleNamespace(compile=True), torch.device("cpu"))
    with pytest.raises(ValueError, match="benchmark.order must be one of"):
        Efficiency(order="random")


def roofline_module():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import roofline

    return roofline


TINY_LLAMAGEN = {"_target_": "lineareval.generators.llamagen.build_generator", "dim": 64, "n_layer": 2, "n_head": 4,
                 "vocab_size": 256, "num_classes": 10, "image_size": 128, "downsample_size": 16}


def test_roofline_counts_the_model_and_the_engine_widths(policy_factory):
    """Per-step work: the matmul FLOPs and weight bytes of the real module, the widths the engine attends."""
    from conftest import tiny_llamagen

    roofline = roofline_module()
    model = tiny_llamagen(grid=8)
    config, layout = model.config, model.layout
    shape = roofline.decode_shape(TINY_LLAMAGEN, prefix_len=1, guided=True)
    assert shape.layout == layout and (shape.layers, shape.heads, shape.head_dim) == (2, 4, 16)
    matrices = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name
                   and "cls_embedding" not in name)
    norms = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 1)
    full = policy_factory("full").needs_scores
    work = roofline.step_work(shape, sequences=4, element=4, width=0, masked=False, needs=full, line_end=False)
    assert work.flops == 2 * 4 * matrices
    logits = 2 * 4 * 4 * config.vocab_size
    assert work.bytes == 4 * (matrices + norms + 4 * config.dim) + config.n_layer * 2 * 4 * 4 * 16 * 4 + logits
    wider = roofline.step_work(shape, 4, 4, 10, False, full, False)
    assert wider.flops - work.flops == config.n_layer * 4 * 4 * config.n_head * 10 * config.head_dim
    full = roofline.attended_widths(policy_factory("full"), layout, 64)
    assert [width for width, _, _ in full] == [1 + index + 1 for index in range(63)]
    window = roofline.attended_widths(policy_factory("window"), layout, 16)
    assert [width for width, _, _ in window] == [1 + min(index + 1, 17) for index in range(63)]
    assert not any(masked for _, masked, _ in full + window)
    linear = roofline.attended_widths(policy_factory("linear"), layout, 16)  # capacity 1 + 16 + 8: grows by line
    assert max(width for width, _, _ in linear) == 25 and [width for width, _, _ in linear][24:32] == list(range(18, 26))


def test_roofline_counts_janus_and_lumina_from_their_modules(make_config):
    """Janus: the language model plus the image aligner and head, one pass; Lumina: two passes with CFG."""
    from lineareval.runner import build_generator

    roofline = roofline_module()
    for family, overrides, passes in (("janus", TINY_TEXT["janus"], 1), ("lumina", TINY_TEXT["lumina"], 2)):
        cfg = make_config(*overrides, "weights=random", "decode_images=false")
        generator = build_generator(cfg, torch.device("cpu"), torch.float32)
        model = OmegaConf.to_container(cfg.model, resolve=True)
        shape = roofline.decode_shape(model, prefix_len=7, guided=True)
        network = generator.model
        decoder = network.language_model if family == "janus" else network.model
        heads = [network.generation_aligner, network.generation_head] if family == "janus" else [network.lm_head]
        matrices = sum(m.weight.numel() for root in [decoder.layers, *heads] for m in root.modules()
                       if isinstance(m, torch.nn.Linear))
        assert shape.linear_params == matrices and shape.passes == passes, family
        assert shape.layout == TokenLayout(7, generator.layout.rows, generator.layout.line_len)
        assert shape.vocab == (network.generation_head.vision_head.out_features if family == "janus"
                               else network.lm_head.out_features)


def test_roofline_bounds_order_and_the_measured_products_are_the_models():
    """Overlapped <= serial bound; the floor adds the cache traffic to the measured products."""
    roofline = roofline_module()
    work = roofline.StepWork(product_flops=10, weight_bytes=4, attention_flops=2, cache_bytes=6, logits_bytes=1)
    assert (work.flops, work.bytes) == (12, 11)
    assert work.bound(1, 1) == 12  # everything overlapped
    assert work.serial_bound(1, 1) == 10 + 6 + 1  # products compute-bound, attention memory-bound, then logits
    assert work.floor(3, 1) == 3 + 7
    shape = roofline.decode_shape({**TINY_LLAMAGEN, "n_layer": 3, "image_size": 64}, prefix_len=1, guided=True)
    run = roofline.step_products(shape, rows=4, device=torch.device("cpu"), dtype=torch.float32)
    with torch.profiler.profile() as profile:
        run()
    calls = sum(event.count for event in profile.key_averages()
                if event.key in ("mkl::_mkl_linear", "aten::mm", "aten::addmm"))
    assert calls == 5 * 3 + 1  # wqkv, wo, w1, w3, w2 per layer and the head


def test_explicit_rows_replace_the_policy_keep_grid(make_config):
    cfg = make_config("benchmark=efficiency", "weights=random", "batch_size=2", "model.image_size=128",
                      "benchmark.warmup=0", "benchmark.rows=[full,linear@1/4,linear@1/2,window@1/2]")
    record = run(cfg)
    assert [(row["cache"], row["keep"]) for row in record["rows"]] == [
        ("full", "1"), ("linear", "1/4"), ("linear", "1/2"), ("window", "1/2")]
    with pytest.raises(ValueError, match="window@1/6"):
        run(make_config("benchmark=efficiency", "weights=random", "benchmark.rows=[full,window]", "force=true"))
