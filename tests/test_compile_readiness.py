"""CUDA-graph readiness of the compiled decode step, proven on CPU for every policy and model family.

CUDA graphs replay a recorded step: the step must be one graph (no graph break), compiled a bounded
number of times, and must never wait for the host (no `.item()`, `.tolist()`, `bool(tensor)`, no
output whose shape depends on tensor values). A whole generation runs with the decode step compiled
by `Stepper.compile` (the `compile=true` path: `fullgraph=True`, dynamic sizes) under a backend
that records every ATen graph instead of generating code, then:

- dynamo counted no graph break, and `fullgraph=True` turns any break into an error (but not a scalar
  read: dynamo captures `int(tensor)` as a symbolic scalar, hence the graph check below);
- each decode function compiled exactly one graph per occupancy-mask state its caches were in
  (the bound: see `graphs_bound`);
- no recorded graph holds a host-synchronising op or a data-dependent shape.

The negative controls show each check fails on a step that breaks it.
"""

from __future__ import annotations

import pytest
import torch

from lineareval.decoding.method import Sequential
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from conftest import ALLOCATION_CONFIGS, CACHE_CONFIGS
from lineareval.cache.allocation import Budgets
from lineareval.cache.store import LayerKV
from lineareval.keep import parse_keep
from lineareval.factory import build_generator, build_policy

aten = torch.ops.aten
# ATen ops that read a tensor's value on the host (scalars, truth values) or size their output by it
HOST_SYNC_OPS = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal, aten.nonzero,
                 aten.masked_select, aten.repeat_interleave, aten._unique2, aten.unique_consecutive,
                 aten.unique_dim}

TINY = {
    "llamagen": ("model=llamagen_tiny", "model.image_size=128"),  # 8 x 8 tokens
    "janus": ("model=janus_pro_1b", "model.text.hidden_size=64", "model.text.intermediate_size=128",
              "model.text.num_hidden_layers=2", "model.text.num_attention_heads=4", "model.text.vocab_size=300",
              "model.gen.num_patches=6", "model.gen.num_embeddings=64",
              "++model.vq={embed_dim:8,num_embeddings:64,base_channels:32,channel_multiplier:[1,1],num_res_blocks:1,"
              "latent_channels:32,num_patches:6,projection_dim:64,image_token_embed_dim:64}"),
    "lumina": ("model=lumina_mgpt_768", "model.resolution=96", "model.lm.hidden_size=64",
               "model.lm.intermediate_size=128", "model.lm.num_hidden_layers=2", "model.lm.num_attention_heads=4",
               "model.lm.vocab_size=9000"),
}
# prompts of different lengths: padded prefixes, so the conditional rows attend with the occupancy mask
PROMPTS = ["a red apple", "two cats asleep on a long green sofa"]


class GraphRecorder:
    """A torch.compile backend that keeps every ATen graph it is given and runs it as is (no codegen)."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs):
        def keep(graph: torch.fx.GraphModule, inputs):
            self.graphs.append(graph)
            return graph

        return aot_autograd(fw_compiler=keep)(graph_module, example_inputs)


def host_syncs(graph: torch.fx.GraphModule) -> list[str]:
    """The nodes of an ATen graph that would make the device wait for the host."""
    found = []
    for node in graph.graph.nodes:
        packet = getattr(node.target, "overloadpacket", None)
        value = node.meta.get("val")
        if packet in HOST_SYNC_OPS or (value is not None and free_unbacked_symbols(value)):
            found.append(node.format_node())
    return found


def graphs_bound(caches) -> int:
    """Graphs one decode function may compile in a generation: one per occupancy-mask state.

    Everything else a step varies is a tensor the host refills (position, slot, line index) or a
    dynamic size (the attended width, the number of sequences); the stores hold a spare slot, so
    the attended slice is never the whole store (no width == capacity specialisation). The mask is
    on for padded prefixes (prompts of different lengths) and, with bucketed widths (CUDA graphs),
    at every step; a generation whose caches differ in that gets one graph for each.
    """
    return len({tuple(group.state.masked for group in cache.groups) for cache in caches})


def tiny_generator(make_config, family: str, policy: str, *extra: str):
    cfg = make_config(*TINY[family], "weights=random", f"cache={policy}", "decode_images=false", *extra)
    generator = build_generator(cfg, torch.device("cpu"), torch.float32)
    return generator, build_policy(cfg.cache)


def compiled_generation(generator, policy, keep: str | Budgets, recorder, *, width_multiple: int = 1,
                        method=None):
    """A whole generation (two images) with the decode step compiled through Stepper.compile; `keep` may be the
    `Budgets` of a budget allocation."""
    torch._dynamo.reset()
    counters.clear()
    step = generator.decoder.stepper
    step.compile("cpu", backend=recorder)
    if width_multiple > 1:  # the CUDA-graph bookkeeping (bucketed widths, masked steps) without a GPU
        step.cuda_graphs, step.width_multiple = True, width_multiple
    budget = keep if isinstance(keep, Budgets) else parse_keep(keep).budget(generator.layout.num_visual)
    conditions = PROMPTS if generator.conditioning == "text" else torch.tensor([3, 7])
    return generator.generate(conditions, torch.arange(2), policy, budget, seed=0, method=method or Sequential())


def keep_for(policy: str) -> str:
    return "1" if policy == "full" else "1/3"


def check_ready(generation, recorder: GraphRecorder) -> None:
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert 1 <= len(recorder.graphs) <= graphs_bound(generation.caches), \
        f"{len(recorder.graphs)} graphs for caches masked {[c.state.masked for c in generation.caches]}"
    syncs = [node for graph in recorder.graphs for node in host_syncs(graph)]
    assert not syncs, f"host synchronisation inside the step: {syncs}"


@pytest.mark.parametrize("policy", CACHE_CONFIGS)
def test_llamagen_decode_step_is_one_graph_without_host_sync(make_config, policy):
    generator, built = tiny_generator(make_config, "llamagen", policy)
    recorder = GraphRecorder()
    generation = compiled_generation(generator, built, keep_for(policy), recorder)
    check_ready(generation, recorder)
    assert len(recorder.graphs) == 1 and generation.tokens.shape == (2, 64)


@pytest.mark.parametrize("policy", CACHE_CONFIGS)
def test_bucketed_widths_keep_one_graph(make_config, policy):
    """CUDA-graph mode buckets the attended width (several shapes per generation) and masks every step."""
    generator, built = tiny_generator(make_config, "llamagen", policy)
    recorder = GraphRecorder()
    generation = compiled_generation(generator, built, keep_for(policy), recorder, width_multiple=8)
    check_ready(generation, recorder)
    assert len(recorder.graphs) == 1 and generation.caches[0].state.always_masked


@pytest.mark.parametrize("allocation", [name for name in ALLOCATION_CONFIGS if name != "uniform"])
@pytest.mark.parametrize("policy", CACHE_CONFIGS)
def test_every_budget_allocation_keeps_one_graph(make_config, policy, allocation):
    """Per-layer budgets (pyramid: a store and an attention width per layer, each a dynamic size, equal until
    the layers first evict) and per-head budgets (adaptive_heads: heads' own counts under the cap, attention
    always masked): one graph for the whole generation, no host synchronisation."""
    from lineareval.factory import build_budgets

    overrides = (f"budget_allocation={allocation}",)
    generator, built = tiny_generator(make_config, "llamagen", policy, *overrides)
    cfg = make_config(*TINY["llamagen"], "weights=random", f"cache={policy}", *overrides)
    budgets = build_budgets(cfg, built, generator, keep=keep_for(policy))
    recorder = GraphRecorder()
    generation = compiled_generation(generator, built, budgets, recorder)
    check_ready(generation, recorder)
    assert len(recorder.graphs) == 1 and generation.tokens.shape == (2, 64)
    if allocation == "pyramid" and policy != "full":
        assert len({layer.state.capacity for layer in generation.caches[0].layers}) == 2  # the layers differ


def text_cases():
    """LineAR (line-end scoring, per-head moves) in the default suite; the other policies are `slow`."""
    for family in ("janus", "lumina"):
        for policy in CACHE_CONFIGS:
            marks = () if policy == "linear" else (pytest.mark.slow,)
            yield pytest.param(family, policy, id=f"{family}-{policy}", marks=marks)


@pytest.mark.parametrize("family, policy", list(text_cases()))
def test_text_models_decode_step_is_ready(make_config, family, policy):
    """Padded prompts (masked attention), CFG rows (Janus) and a second cache for the unconditional
    context (Lumina, unmasked: its prefix is never padded): within the bound, one graph per mask state."""
    generator, built = tiny_generator(make_config, family, policy)
    recorder = GraphRecorder()
    generation = compiled_generation(generator, built, keep_for(policy), recorder)
    check_ready(generation, recorder)
    assert len(recorder.graphs) == graphs_bound(generation.caches)


def speculative_cases():
    """Every policy on LlamaGen; LineAR on the text families (padded prompts; Lumina's second cache)."""
    for family in ("llamagen", "janus", "lumina"):
        for policy in CACHE_CONFIGS:
            if family == "llamagen" or policy == "linear":
                yield pytest.param(family, policy, id=f"{family}-{policy}")


@pytest.mark.parametrize("family, policy", list(speculative_cases()))
def test_the_speculative_verify_step_is_one_graph_without_host_sync(make_config, family, policy):
    """SJD's verify step (a window of drafts per sequence, causal among themselves) compiled through the same
    Stepper.compile: every chunk is padded to the window, so the whole generation is one graph per cache
    kind, with no graph break and no host synchronisation; and its tokens are those of eager SJD."""
    from lineareval.decoding.speculative import Speculative

    generator, built = tiny_generator(make_config, family, policy, "sampling.top_k=1")
    recorder = GraphRecorder()
    generation = compiled_generation(generator, built, keep_for(policy), recorder, method=Speculative(window=4))
    check_ready(generation, recorder)
    assert len(recorder.graphs) == 1, f"{len(recorder.graphs)} graphs"
    eager, _ = tiny_generator(make_config, family, policy, "sampling.top_k=1")
    conditions = PROMPTS if eager.conditioning == "text" else torch.tensor([3, 7])
    budget = parse_keep(keep_for(policy)).budget(eager.layout.num_visual)
    expected = eager.generate(conditions, torch.arange(2), built, budget, seed=0, method=Speculative(window=4))
    assert torch.equal(generation.tokens, expected.tokens)


# ---- negative controls: each check fails on a step that breaks it ---------------------------------------

def test_a_graph_break_inside_the_step_is_an_error(make_config, monkeypatch):
    """`fullgraph=True` in Stepper.compile: a break is an error, never a silent split into several graphs."""
    original = LayerKV.attend

    def attend_with_a_break(self, query):
        torch._dynamo.graph_break()
        return original(self, query)

    monkeypatch.setattr(LayerKV, "attend", attend_with_a_break)
    generator, built = tiny_generator(make_config, "llamagen", "linear")
    with pytest.raises(torch._dynamo.exc.Unsupported):
        compiled_generation(generator, built, "1/3", GraphRecorder())


def test_a_host_read_inside_the_step_is_found_in_the_graph(make_config, monkeypatch):
    """A scalar read (`int(tensor)`, `.item()`) compiles without a break (dynamo captures it as a symbolic
    scalar), so `fullgraph=True` alone would not catch it: the graph check does."""
    original = LayerKV.attend

    def attend_with_a_scalar(self, query):
        return original(self, query) * (int(self.step.position) >= 0)

    monkeypatch.setattr(LayerKV, "attend", attend_with_a_scalar)
    monkeypatch.setattr(torch._dynamo.config, "capture_scalar_outputs", True)  # captured, whatever the default
    generator, built = tiny_generator(make_config, "llamagen", "linear")
    recorder = GraphRecorder()
    compiled_generation(generator, built, "1/3", recorder)
    assert not counters["graph_break"]
    assert any("_local_scalar_dense" in node for graph in recorder.graphs for node in host_syncs(graph))


def test_a_data_dependent_shape_is_found_in_the_graph(make_config, monkeypatch):
    original = LayerKV.attend

    def attend_with_nonzero(self, query):
        occupied = self.valid[0, 0].nonzero()  # its length is the occupancy: a data-dependent size
        return original(self, query) + 0 * occupied.sum()

    monkeypatch.setattr(LayerKV, "attend", attend_with_nonzero)
    monkeypatch.setattr(torch._dynamo.config, "capture_dynamic_output_shape_ops", True)
    generator, built = tiny_generator(make_config, "llamagen", "linear")
    recorder = GraphRecorder()
    compiled_generation(generator, built, "1/3", recorder)
    assert any(host_syncs(graph) for graph in recorder.graphs)


def test_without_the_spare_slot_the_last_widths_compile_again(make_config, monkeypatch):
    """The bound is tight for a reason: a store exactly `capacity` wide specialises width == capacity."""
    from lineareval.decoding import stepper

    original = stepper.KVCache
    monkeypatch.setattr(stepper, "KVCache", lambda *args, **options: original(*args, **{**options,
                                                                                        "spare_slot": False}))
    generator, built = tiny_generator(make_config, "llamagen", "linear")
    recorder = GraphRecorder()
    compiled_generation(generator, built, "1/3", recorder)
    assert len(recorder.graphs) == 2
