"""Runs a model's cached step on its caches: eager or compiled, one token or a chunk per sequence.

The model protocol (`CachedModel`): a model writes a prefix into a cache (`prefill`) and runs a step
of k >= 1 new tokens per sequence at given RoPE positions (`step`), returning their logits; it says
what its cache holds (`cache_spec`). Everything else here is inference machinery the models do not
carry: the cache's schedule around each step, torch.compile (inductor on CPU, CUDA graphs on GPU),
CPU weight packing, and the caches kept for CUDA graphs.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn

from lineareval.cache import CachePolicy, KVCache, TokenLayout
from lineareval.models.packed import pack_linears


class CachedModel(Protocol):
    """What the decoder drives. Shapes: S sequences, k new tokens per sequence, V the vocabulary."""

    def cache_spec(self) -> dict:
        """`KVCache` sizes: num_layers, heads, head_dim, dtype, device."""

    def prefill(self, prefix, cache: KVCache) -> torch.Tensor:
        """Write the condition prefix into `cache`; logits for visual token 0, (S, V)."""

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed tokens (S, k) at RoPE positions (S, k) into the cache's reserved slots; logits (S, k, V)."""


class Stepper:
    """A model's step with the cache schedule around it, eager or compiled.

    Compiled (`compile`): the step (embedding, every layer's cache write and attention, logits) has
    static shapes: the cache is preallocated and what changes per step is either a preallocated
    tensor or a host number the compiler specialises on (the mask flag) or treats as a dynamic size
    (the attention width, the number of sequences). On GPU the attention width is bucketed to
    multiples of `width_multiple` slots, so CUDA graphs are recorded for a handful of widths, every
    step attends with the occupancy mask, and the stores are marked static so that graphs never copy
    them. The step compiles to one graph per occupancy-mask state (at most two;
    tests/test_compile_readiness.py proves the bound and the absence of host synchronisation).
    Compilation happens on the first steps of the first generation (a warm-up, excluded from timing).
    Multi-token chunks (speculative decoding's verify step) compile too, padded to one window.

    On a CPU (fp32, MKL) every new cache also packs the model's `Linear` weights for products of as
    many rows as the cache has sequences (`pack_linears`), eager or compiled: a second copy of those
    weights in memory, for about 20% faster decode products.
    """

    RECOMPILE_LIMIT = 64  # a graph per mask state x the policies of a process

    def __init__(self, model: nn.Module):
        self.model = model
        self.step = model.step
        self.compiled = False
        self.cuda_graphs = False
        self.width_multiple = 64  # CUDA graphs: attention widths bucketed to multiples of this many slots
        self._caches: dict[tuple, KVCache] = {}  # CUDA graphs: caches kept for the next generation

    def compile(self, device: torch.device | str, backend="inductor") -> None:
        """torch.compile the step: one graph (`fullgraph=True`: a graph break is an error), sizes symbolic from
        the start. `backend` is torch.compile's (tests record graphs instead of compiling them)."""
        self.cuda_graphs = torch.device(device).type == "cuda"
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, self.RECOMPILE_LIMIT)
        mode = "reduce-overhead" if self.cuda_graphs and backend == "inductor" else None
        self.step = torch.compile(self.model.step, backend=backend, mode=mode, fullgraph=True, dynamic=True)
        self.compiled = True

    def new_cache(self, policy: CachePolicy, budget: int, sequences: int, layout: TokenLayout,
                  max_chunk: int = 1) -> KVCache:
        """A cache for `sequences` rows; with CUDA graphs, a kept cache, emptied, when what shapes it matches.

        CUDA graphs bake in the stores' addresses: reusing the stores lets the next generation replay
        the recorded graphs instead of re-recording them. Caches of another policy or budget are
        released first, and at most two are kept (Lumina-mGPT runs the conditional and the
        unconditional sequences in two caches), so memory follows the run. A compiled step's cache
        gets a spare slot (`KVCache(spare_slot=True)`: one graph for every width).
        """
        def build() -> KVCache:
            return KVCache(policy, layout, budget, sequences=sequences, spare_slot=self.compiled, max_chunk=max_chunk,
                           **self.model.cache_spec())

        if not self.cuda_graphs:
            pack_linears(self.model, sequences)  # CPU fp32 only; elsewhere nothing to pack
            return build()
        key = (repr(policy), budget, sequences, layout, max_chunk)
        if key in self._caches:
            cache = self._caches[key]
            cache.reset(policy)
            return cache
        for held in [held for held in self._caches if held[:2] != key[:2]] + list(self._caches)[:-1]:
            self._caches.pop(held, None)  # release before allocating
        cache = self._caches[key] = build()
        cache.prepare_for_cuda_graphs(self.width_multiple)
        return cache

    def prefill(self, prefix, cache: KVCache) -> torch.Tensor:
        """The prefix into the cache; logits for visual token 0 (S, V)."""
        cache.begin_prefix()
        return self.model.prefill(prefix, cache)

    def decode(self, tokens: torch.Tensor, visual_index: int, cache: KVCache,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """Feed visual token `visual_index` of every sequence, tokens (S,) at RoPE positions (S,) (default: the
        layout's, prefix_len + visual_index); logits for the next one (S, V). Evicts per the policy."""
        cache.begin_step(visual_index)  # host bookkeeping: slot, width, mask; refills the step tensors
        if positions is None:
            positions = torch.full_like(tokens, cache.layout.prefix_len + visual_index)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs have been consumed
        logits = self.step(tokens[:, None], positions[:, None], cache)[:, 0]
        cache.commit()  # eviction, outside the compiled step: it runs at scoring points only
        return logits

    def decode_chunk(self, tokens: torch.Tensor, first: torch.Tensor, cache: KVCache,
                     positions: torch.Tensor | None = None) -> torch.Tensor:
        """Feed a chunk: tokens (S, k), sequence s's visual tokens first[s] .. first[s] + k - 1, at RoPE positions
        (S, k) (default: the layout's); logits (S, k, V). `cache.commit(counts)` then keeps a prefix of each.

        Compiled, every chunk is padded to the cache's `max_chunk` (the speculative window): one static
        shape, so the verify step is one graph like the one-token step. The padding repeats the last token
        at the last position; it comes after the real tokens (causal: they never see it) and is rolled back
        by the commit, which keeps at most the real k."""
        length = tokens.shape[1]
        if positions is None:
            positions = cache.layout.prefix_len + first[:, None].to(tokens.device) + torch.arange(
                length, device=tokens.device)
        if self.compiled and length < cache.max_chunk:
            pad = cache.max_chunk - length
            tokens = torch.cat([tokens, tokens[:, -1:].expand(-1, pad)], dim=1)
            positions = torch.cat([positions, positions[:, -1:].expand(-1, pad)], dim=1)
        cache.begin_chunk(first, tokens.shape[1])
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self.step(tokens, positions, cache)[:, :length]
