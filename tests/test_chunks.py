"""Multi-token cache steps: chunks of k tokens per sequence, then a commit of a prefix of each.

The oracle: every committed query's logits equal those of a cache-free forward over the whole
sequence whose attention, for that query, shows exactly what the engine showed it (the cache as the
chunk began, in that layer, head and sequence, plus the chunk's own earlier tokens). Random chunk
lengths and random per-sequence commit counts (a conditional row and its unconditional row commit
together, as speculative decoding needs), for every policy; a chunk of one token is sequential
decoding; the store after a commit is what it would be had only the committed tokens been written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from conftest import ALLOCATION_CONFIGS, CACHE_CONFIGS, decoder_depth, llamagen_depth, roundoff_tolerance, tiny_llamagen
from lineareval.cache import EvictAt, TokenLayout
from lineareval.decoding.stepper import Stepper
from lineareval.keep import parse_keep
from lineareval.models.chameleon import ChameleonLM, ChameleonLMConfig
from lineareval.models.layers import TextPrefix
from test_cache import run_policy

KEEPS = ["1/4", 21]


@dataclass
class ChunkTrace:
    logits: torch.Tensor  # (S, N - 1, V): the logits each committed query produced
    visible: torch.Tensor  # (L, S, H, N - 1, T): what each committed query attended to (T = P + N)
    chunks: int


def random_commits(rng: np.random.Generator, length: int, batch: int, left: np.ndarray) -> np.ndarray:
    """Per image a commit count in [0, length], never past the image's end, at least one image moving on;
    the conditional and unconditional rows of image b share it (rows b and b + batch)."""
    counts = np.minimum(rng.integers(0, length + 1, size=batch), left[:batch])
    if not counts.any():
        counts[np.flatnonzero(left[:batch])[0]] = 1
    return np.concatenate([counts, counts])


@torch.inference_mode()
def run_chunked(stepper: Stepper, cache, prefix, tokens: torch.Tensor, positions: torch.Tensor, rng,
                max_chunk: int, clip_at_line_end: bool = False) -> ChunkTrace:
    """Feed `tokens` (S, N) (RoPE positions (S, N)) in random chunks with random paired commits until every
    sequence has committed tokens 0 .. N - 2 (the last is only sampled). `clip_at_line_end`: no chunk
    goes past any unfinished sequence's next line end (as speculative decoding clips its windows)."""
    sequences, num_visual = tokens.shape
    stepper.prefill(prefix, cache)
    total = cache.layout.prefix_len + num_visual
    heads = cache.layers[0].positions.shape[1]
    visible = torch.zeros(len(cache.layers), sequences, heads, num_visual - 1, total, dtype=torch.bool)
    logits = None
    committed, chunks = np.zeros(sequences, dtype=np.int64), 0
    while (committed < num_visual - 1).any():
        left = num_visual - 1 - committed
        length = min(int(rng.integers(1, max_chunk + 1)), int(left.max()))
        if clip_at_line_end:
            line = cache.layout.line_len
            length = min(length, int((line - committed[left > 0] % line).min()))
        # a sequence with fewer tokens left feeds its last one again in the extra places: never committed
        take = np.minimum(committed[:, None] + np.arange(length), num_visual - 2)
        before = cache.visible_positions()
        out = stepper.decode_chunk(tokens.gather(1, torch.from_numpy(take)), torch.from_numpy(committed), cache,
                                   positions.gather(1, torch.from_numpy(take)))
        counts = random_commits(rng, length, sequences // 2, left)
        if logits is None:
            logits = torch.zeros(sequences, num_visual - 1, out.shape[-1])
        for row in range(sequences):
            for order in range(counts[row]):
                index = committed[row] + order
                logits[row, index] = out[row, order]
                for layer, layer_map in enumerate(before):
                    seen = layer_map[row].clone()
                    seen[:, cache.layout.prefix_len + committed[row]: cache.layout.prefix_len + index + 1] = True
                    visible[layer, row, :, index] = seen
        cache.commit(counts)
        committed += counts
        chunks += 1
    return ChunkTrace(logits, visible, chunks)


def chunk_masks(trace: ChunkTrace, prefix: int) -> list[torch.Tensor]:
    """Per layer (S, H, T, T) masks for the teacher-forced forward over T = P + N - 1 positions."""
    layers, sequences, heads, steps, total = trace.visible.shape
    length = prefix + steps
    causal = torch.tril(torch.ones(prefix, length, dtype=torch.bool)).expand(sequences, heads, -1, -1)
    return [torch.cat([causal, trace.visible[layer, ..., :length]], dim=2) for layer in range(layers)]


@pytest.fixture(scope="module")
def llamagen_setup():
    model = tiny_llamagen(grid=8)
    tokens = torch.randint(0, model.config.vocab_size, (4, model.layout.num_visual),
                           generator=torch.Generator().manual_seed(1))
    return model, torch.tensor([3, 7, 10, 10]), tokens  # two images: [cond; uncond] rows


def cases():
    """Every policy at both keeps and both seeds under the uniform allocation; under the others at 21 tokens."""
    for allocation in ALLOCATION_CONFIGS:
        for name in CACHE_CONFIGS:
            for keep in (["1"] if name == "full" else KEEPS if allocation == "uniform" else KEEPS[1:]):
                for seed in ([0, 1] if allocation == "uniform" else [0]):
                    yield pytest.param(name, keep, allocation, seed, id=f"{name}-{keep}-{allocation}-{seed}")


@pytest.mark.parametrize("name, keep, allocation, seed", list(cases()))
def test_random_chunks_and_commits_equal_the_masked_full_cache(llamagen_setup, policy_factory, budgets_for, name,
                                                               keep, allocation, seed):
    model, labels, tokens = llamagen_setup
    layout = model.layout
    policy = policy_factory(name)
    budgets = budgets_for(policy, parse_keep(keep).budget(layout.num_visual), allocation, model)
    stepper = Stepper(model)
    cache = stepper.new_cache(policy, budgets, len(labels), layout, max_chunk=5)
    positions = layout.prefix_len + torch.arange(layout.num_visual).expand(len(labels), -1)
    trace = run_chunked(stepper, cache, labels, tokens, positions, np.random.default_rng(seed), max_chunk=5)
    oracle = model(labels, tokens[:, :-1], chunk_masks(trace, layout.prefix_len))[:, layout.prefix_len:]
    torch.testing.assert_close(trace.logits, oracle, **roundoff_tolerance(oracle, llamagen_depth(model)))
    assert trace.chunks < layout.num_visual - 1  # chunks of several tokens were taken
    for layer, layer_map in zip(cache.layers, cache.visible_positions()):  # visual tokens at the end: (S, H)
        kept = layer_map[..., layout.prefix_len:].sum(-1)
        held = torch.from_numpy(layer.state.visual)[:, None]  # each sequence's count (per head on average)
        assert (kept.sum(-1, keepdim=True) == held * kept.shape[1]).all()  # no token lost or duplicated
        if policy.evicts_at is not EvictAt.NEVER:
            assert (held <= layer.state.capacity).all() and layer.state.evictions > 0
            assert (held <= max(budgets.layers) + layout.line_len).all()
    assert (np.asarray(cache.state.next) == layout.num_visual - 1).all()


@pytest.mark.parametrize("allocation", ALLOCATION_CONFIGS)
@pytest.mark.parametrize("name", CACHE_CONFIGS)
def test_chunks_of_one_token_are_sequential_decoding(llamagen_setup, policy_factory, budgets_for, name, allocation):
    """Ragged single-token steps (every policy evicting per sequence and head) keep exactly the tokens that the
    sequential fast path keeps, step by step, and give its logits, under every budget allocation."""
    model, labels, tokens = llamagen_setup
    layout = model.layout
    budget = budgets_for(policy_factory(name), 64 if name == "full" else 21, allocation, model)
    sequential = run_policy(model, policy_factory(name), budget, labels, tokens)
    stepper = Stepper(model)
    cache = stepper.new_cache(policy_factory(name), budget, len(labels), layout, max_chunk=2)  # a cache for chunks
    with torch.inference_mode():
        stepper.prefill(labels, cache)
        for index in range(layout.num_visual - 1):
            logits = stepper.decode_chunk(tokens[:, index: index + 1], torch.full((4,), index), cache)[:, 0]
            cache.commit([1] * 4)
            torch.testing.assert_close(logits, sequential.logits[:, index + 1],
                                       **roundoff_tolerance(logits, llamagen_depth(model)))
            assert all(torch.equal(a, b) for a, b in zip(cache.visible_positions(), sequential.after[index]))


def test_a_rolled_back_chunk_leaves_the_store_as_if_never_written(llamagen_setup, policy_factory):
    """Commit 2 of 4 tokens: the store equals one where only those 2 were written (keys, values, positions)."""
    model, labels, tokens = llamagen_setup
    layout = model.layout
    stores = []
    for chunk in (4, 2):
        stepper = Stepper(model)
        cache = stepper.new_cache(policy_factory("linear"), 24, 4, layout, max_chunk=4)
        with torch.inference_mode():
            stepper.prefill(labels, cache)
            stepper.decode_chunk(tokens[:, :chunk], torch.zeros(4, dtype=torch.long), cache)
            cache.commit([2] * 4)
        layer = cache.layers[0]
        valid = layer.valid.clone()
        stores.append((valid, layer.positions.clone(), layer.keys[valid].clone(), layer.signals["line"].queries[
            :, :, :2].clone(), cache.state.occupancy.copy(), cache.state.next.copy()))
    (valid, positions, keys, queries, occupancy, following), expected = stores
    assert torch.equal(valid, expected[0]) and torch.equal(positions, expected[1])
    torch.testing.assert_close(keys, expected[2], rtol=0, atol=0)
    torch.testing.assert_close(queries, expected[3], rtol=0, atol=0)
    assert (occupancy == expected[4]).all() and (following == expected[5]).all() and (following == 2).all()


def test_line_end_chunks_keep_what_sequential_decoding_keeps(llamagen_setup, policy_factory):
    """LineAR with chunks that stop at line ends (as speculative decoding clips them) and committed in full:
    the same evictions as sequential decoding, so the final cache holds the same positions."""
    model, labels, tokens = llamagen_setup
    layout = model.layout
    sequential = run_policy(model, policy_factory("linear"), 24, labels, tokens)
    stepper = Stepper(model)
    cache = stepper.new_cache(policy_factory("linear"), 24, 4, layout, max_chunk=layout.line_len)
    positions = layout.prefix_len + torch.arange(layout.num_visual).expand(4, -1)

    rng = np.random.default_rng(3)
    with torch.inference_mode():
        stepper.prefill(labels, cache)
        committed = 0
        while committed < layout.num_visual - 1:
            length = min(int(rng.integers(1, layout.line_len + 1)), layout.line_len - committed % layout.line_len,
                         layout.num_visual - 1 - committed)
            stepper.decode_chunk(tokens[:, committed: committed + length], torch.full((4,), committed), cache,
                                 positions[:, committed: committed + length])
            cache.commit([length] * 4)
            committed += length
    assert all(torch.equal(a, b) for a, b in zip(cache.visible_positions(), sequential.after[-1]))


# ---- a text model: left-padded prefixes (Chameleon, as Lumina-mGPT; Janus-Pro's Llama takes the same path) ----

@pytest.fixture(scope="module")
def chameleon():
    torch.manual_seed(0)
    model = ChameleonLM(ChameleonLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=512))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.3)
    return model.float().eval()


@pytest.mark.parametrize("allocation", ALLOCATION_CONFIGS)
@pytest.mark.parametrize("name", CACHE_CONFIGS)
def test_padded_prefixes_with_random_chunks_equal_the_masked_forward(chameleon, make_config, policy_factory, name,
                                                                     allocation):
    from lineareval.cache.allocation import allocate

    layout, sequences = TokenLayout(prefix_len=3, rows=6, line_len=4), 4
    total = layout.prefix_len + layout.num_visual
    ids = torch.randint(0, 512, (sequences, total), generator=torch.Generator().manual_seed(5))
    present = torch.tensor([[True, True, True], [False, True, True], [True, True, True], [False, True, True]])
    positions = (torch.arange(total) - (~present).sum(1, keepdim=True)).clamp(min=0)  # (S, T)
    budget = layout.num_visual if name == "full" else parse_keep("1/2").budget(layout.num_visual)
    policy = policy_factory(name)
    budget = allocate(make_config(f"budget_allocation={allocation}").budget_allocation, budget, layers=2, heads=4,
                      layout=layout, policy=policy, model="chameleon")
    stepper = Stepper(chameleon)
    cache = stepper.new_cache(policy, budget, sequences, layout, max_chunk=4)
    prefix = TextPrefix(ids[:, :3], positions[:, :3], present)
    trace = run_chunked(stepper, cache, prefix, ids[:, 3:], positions[:, 3:], np.random.default_rng(7), 4)
    masks = chunk_masks(trace, layout.prefix_len)
    for mask in masks:  # padding keys are never attended; a padding query sees itself
        mask[:, :, :, :3] &= present[:, None, None, :]
        mask[:, :, :3, :3] |= torch.eye(3, dtype=torch.bool)
    oracle = chameleon(ids[:, :-1], positions[:, :-1], masks)[:, layout.prefix_len:]
    depth = decoder_depth(2, 64, 128, 16, total)
    torch.testing.assert_close(trace.logits, oracle, **roundoff_tolerance(oracle, depth))


@pytest.mark.parametrize("name, source", [("linear", "line"), ("linear", "cumulative"), ("h2o", None)])
def test_chunk_scores_are_the_committed_queries_attention(llamagen_setup, policy_factory, name, source):
    """At each sequence's scoring point the policy sees the attention of its committed queries only: LineAR the
    line's queries (mean) or all lines' (sum), H2O every query so far; rolled-back drafts leave no trace.

    LineAR scores a line at its end from the line's buffered queries against the cache then (as sequential
    decoding does); a chunk that crossed the previous line end attended before that line end's eviction,
    so for LineAR the chunks stop at line ends, as speculative decoding's windows do."""
    from test_cache import attention_probabilities, score_tolerance

    model, labels, tokens = llamagen_setup
    layout, prefix, n = model.layout, model.layout.prefix_len, model.layout.line_len
    policy = policy_factory(name, *([f"cache.score_source={source}"] if source else []))
    scored, original = [], policy.score

    def score(view, context):
        scores = original(view, context)
        scored.append((scores.clone(), view.positions.clone(), view.valid.clone(), context.visual_index.flatten(),
                       context.rows.clone()))
        return scores

    object.__setattr__(policy, "score", score)
    stepper = Stepper(model)
    cache = stepper.new_cache(policy, 16, len(labels), layout, max_chunk=5)
    positions = prefix + torch.arange(layout.num_visual).expand(len(labels), -1)
    trace = run_chunked(stepper, cache, labels, tokens, positions, np.random.default_rng(4), max_chunk=5,
                        clip_at_line_end=name == "linear")
    probabilities = attention_probabilities(model, labels, tokens[:, :-1], chunk_masks(trace, prefix))
    assert scored
    for number, (scores, slot_positions, valid, steps, rows) in enumerate(scored):
        layer = number % len(probabilities)
        for row in rows.nonzero().flatten().tolist():
            step = int(steps[row])
            queries = probabilities[layer][row, :, prefix: prefix + step + 1]  # (H, step + 1, T)
            if source == "line":
                expected = queries[:, -n:].mean(1)
                middle = (slot_positions[row] >= prefix + n) & (slot_positions[row] < prefix + step + 1 - n)
            else:  # summed over every committed query while the token was cached
                expected = queries.sum(1)
                middle = torch.isfinite(scores[row]) & (slot_positions[row] >= prefix)
            got = scores[row][valid[row] & middle]
            want = torch.gather(expected, 1, slot_positions[row].clamp(min=0))[valid[row] & middle]
            torch.testing.assert_close(got, want, **score_tolerance(model, layer, probabilities[layer]))


def test_rolled_back_queries_never_enter_the_line_buffer(llamagen_setup, policy_factory):
    """A chunk that crosses a line end, committed only up to before it for one image: that image's buffered line
    queries are those of its committed tokens (as one-token steps give them), not the rolled-back drafts'."""
    model, labels, tokens = llamagen_setup
    layout, n = model.layout, model.layout.line_len
    buffers = []
    for chunked in (True, False):
        stepper = Stepper(model)
        cache = stepper.new_cache(policy_factory("linear"), 48, 4, layout, max_chunk=n)
        with torch.inference_mode():
            stepper.prefill(labels, cache)
            for index in range(n + 4):  # into the second line: its tokens 0..3 are buffered
                stepper.decode_chunk(tokens[:, index: index + 1], torch.full((4,), index), cache)
                cache.commit([1] * 4)
            first = n + 4
            if chunked:  # tokens 12..17 of a line of 8: image 0 commits 12, 13; image 1 all six (past the line end)
                stepper.decode_chunk(tokens[:, first: first + 6], torch.full((4,), first), cache)
                cache.commit([2, 6, 2, 6])
            else:
                for row_counts in ([1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 0, 1], [0, 1, 0, 1], [0, 1, 0, 1], [0, 1, 0, 1]):
                    stepper.decode_chunk(tokens[:, first: first + 1].clone(), torch.from_numpy(
                        np.asarray(cache.state.next)), cache,
                        layout.prefix_len + torch.from_numpy(np.asarray(cache.state.next))[:, None])
                    cache.commit(row_counts)
                    first += 1
        buffers.append(torch.stack([layer.signals["line"].queries for layer in cache.layers]))
    chunked, stepwise = buffers
    # A chunk of 6 tokens and one-token steps run other matrix kernels (GEMM vs GEMV; MKL picks them by CPU:
    # 1.8e-6 apart on an AMD EPYC, within 1e-6 on Intel), so the two differ by round-off alone. A layer's queries
    # come from the layers below it and its q projection, a chain no longer than the logits' (llamagen_depth):
    # the bound of `roundoff_tolerance` over that depth at the queries' magnitude holds on every CPU, and a
    # rolled-back draft's query in the buffer would be off by the query's own size (O(1)), far above it.
    torch.testing.assert_close(chunked[:, [0, 2]], stepwise[:, [0, 2]],
                               **roundoff_tolerance(stepwise[:, [0, 2]], llamagen_depth(model)))
