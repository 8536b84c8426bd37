"""Llama-family building blocks shared by our Janus-Pro (Llama) and Lumina-mGPT (Chameleon) ports.

Names follow transformers' modules (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`,
`{input,post_attention}_layernorm`, Chameleon's `self_attn.{q,k}_norm`), so Hugging Face checkpoints
load one to one. RoPE uses the rotate-half layout of those checkpoints with explicit positions;
keys enter the cache after q/k norm and RoPE, exactly as attention uses them.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lineareval.cache import KVCache, LayerKV
from lineareval.memory import tensor_bytes

log = logging.getLogger(__name__)

QK_NORM_EPS = 1e-5  # fixed in Chameleon's q/k LayerNorm, independent of rms_norm_eps


@torch.library.custom_op("lineareval::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  rows: int) -> torch.Tensor:
    """x (M, in) @ weight.T (+ bias) with MKL's packed copy of `weight` for M == rows (else a plain product).

    An opaque op for torch.compile: inductor only lowers MKL's packed product for weights frozen
    into the graph, and our decode step keeps them as inputs.
    """
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)


@packed_linear.register_fake
def _(x, packed, weight, bias, rows):
    return x.new_empty(x.shape[0], weight.shape[0])


class PackedWeight(NamedTuple):
    rows: int
    weight: torch.Tensor  # MKL's packed layout (opaque), made for products of `rows` rows
    source: tuple[int, int]  # the packed weight's storage address and version: a changed weight is repacked


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint keys) that can use an MKL-packed weight on CPU.

    A decode step multiplies S rows (one token per sequence) by every weight matrix. MKL repacks the
    weight on every plain fp32 product; a copy packed once for S rows skips that, and each decode
    product runs about 20% faster on a CPU (measured on the CPU efficiency configuration). Products
    of another row count (a prefill) and products that need a gradient use the plain product.
    `pack_linears` makes the copies.
    """

    packed: PackedWeight | None = None

    def _apply(self, fn, recurse=True):  # .to(), .half(), ...: the copy would be stale
        self.packed = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):  # new weights: likewise
        self.packed = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed
        if (packed is None or x.numel() != packed.rows * x.shape[-1]
                or (torch.is_grad_enabled() and self.weight.requires_grad)):  # MKL's product has no gradient
            return F.linear(x, self.weight, self.bias)
        product = packed_linear if torch.compiler.is_compiling() else torch.ops.mkl._mkl_linear  # eager: no wrapper
        out = product(x.reshape(packed.rows, -1), packed.weight, self.weight, self.bias, packed.rows)
        return out.view(*x.shape[:-1], out.shape[-1])


def can_pack(weight: torch.Tensor) -> bool:
    """MKL packs fp32 CPU weights (PyTorch built with MKL, as the x86 wheels are)."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkl.is_available()


def available_memory() -> int:
    """Bytes of memory the system has available (Linux; elsewhere assume plenty)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _source(weight: torch.Tensor) -> tuple[int, int]:
    """The weight's storage address and version: either changes when the weight does."""
    try:
        return weight.data_ptr(), weight._version
    except RuntimeError:  # an inference-mode tensor keeps no version: it cannot change outside inference mode
        return weight.data_ptr(), -1


def pack_linears(module: nn.Module, rows: int) -> int:
    """Give every `Linear` of `module` an MKL-packed weight for products of `rows` rows (replacing
    copies packed for another count, or for a weight changed since: moved, loaded or written in place;
    writes through `.data` keep no version, so pack again after those with `unpack_linears` first).

    Returns the bytes of the packed weights; the copies take about as much again (RSS grows by that
    much, whatever their opaque tensors' numel says). 0 where MKL cannot pack, and where the copies
    still to make would take more than half of the memory the system has available (then every
    product stays plain, with a warning).
    """
    packable, stale = [], []
    for linear in module.modules():
        if not isinstance(linear, Linear):
            continue
        if not can_pack(linear.weight):
            linear.packed = None
            continue
        packable.append(linear)
        if linear.packed is None or (linear.packed.rows, linear.packed.source) != (rows, _source(linear.weight)):
            stale.append(linear)
    missing = tensor_bytes(*(linear.weight for linear in stale))
    if missing > available_memory() // 2:
        if not getattr(module, "_packing_refused", False):  # once, not at every batch's new cache
            log.warning("not packing %.2f GB of decode weights (%.2f GB of memory available): plain products",
                        missing / 1e9, available_memory() / 1e9)
        module._packing_refused = True
        unpack_linears(module)
        return 0
    module._packing_refused = False
    for linear in stale:
        linear.packed = None  # free the stale copy first
        with torch.no_grad():
            packed = torch.ops.mkl._mkl_reorder_linear_weight(linear.weight.detach(), rows)
        linear.packed = PackedWeight(rows, packed, _source(linear.weight))
    return tensor_bytes(*(linear.weight for linear in packable))


def unpack_linears(module: nn.Module) -> None:
    """Drop the packed copies (plain products again, and their memory freed)."""
    for linear in module.modules():
        if isinstance(linear, Linear):
            linear.packed = None


class RMSNorm(nn.Module):
    """Normalise in fp32, cast back, then scale (LlamaGen, Llama and Chameleon agree on this order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def inverse_frequencies(head_dim: int, theta: float, device: torch.device | None = None,
                        linear_factor: float = 1.0) -> torch.Tensor:
    """(head_dim / 2,) fp32 RoPE frequencies (divided by a linear scaling factor if any)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta ** exponents) / linear_factor


def rotary(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (S, 1, T, D) for position_ids (S, T): angles in fp32, then cast to the activations' dtype
    (as transformers does, so bf16 runs match it)."""
    angles = position_ids[..., None].float() * inv_freq.float()  # (S, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # rotate-half layout: both halves share angles
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the halves (x1, x2) of the last dim: x * cos + (-x2, x1) * sin. x: (S, H, T, D)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class QKNorm(nn.Module):
    """Chameleon's q/k LayerNorm: statistics over head_dim only, then each head's own gain and bias."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., H, D)
        return F.layer_norm(x, x.shape[-1:], eps=QK_NORM_EPS) * self.weight + self.bias


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=bias)
        self.up_proj = Linear(dim, hidden, bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Multi-head attention writing into our cache; optional per-head q/k norm (Chameleon)."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool = False, qk_norm: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.q_proj = Linear(dim, inner, bias=bias)
        self.k_proj = Linear(dim, inner, bias=bias)
        self.v_proj = Linear(dim, inner, bias=bias)
        self.o_proj = Linear(inner, dim, bias=bias)
        if qk_norm:
            self.q_norm = QKNorm(heads, head_dim)
            self.k_norm = QKNorm(heads, head_dim)
        self.qk_norm = qk_norm

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(S, T, dim) -> q, k, v each (S, H, T, D); q and k normed per head (if enabled), then rotated."""
        batch, length, _ = x.shape
        shape = (batch, length, self.heads, self.head_dim)
        q, k = self.q_proj(x).view(shape), self.k_proj(x).view(shape)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        return apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin), v

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        return self.o_proj(out.transpose(1, 2).flatten(2))  # (S, H, T, D) -> (S, T, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: LayerKV | None = None, present: torch.Tensor | None = None) -> torch.Tensor:
        """Whole-sequence attention (causal, or `mask` (S, H|1, T, T) True = attend); fills `cache` if given."""
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            cache.write_prefix(k, v, present)
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None))

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerKV) -> torch.Tensor:
        """One new token per sequence against the cache (its slot and position are the cache's). x: (S, 1, dim)."""
        q, k, v = self.project(x, cos, sin)
        cache.append(k, v)
        return self.merge(cache.attend(q))


class DecoderLayer(nn.Module):
    """Pre-norm Llama block, or with `swin_norm` the norms applied to each branch's output instead."""

    def __init__(self, dim: int, hidden: int, heads: int, head_dim: int, eps: float, *, bias: bool = False,
                 mlp_bias: bool = False, qk_norm: bool = False, swin_norm: bool = False):
        super().__init__()
        self.swin_norm = swin_norm
        self.self_attn = Attention(dim, heads, head_dim, bias, qk_norm)
        self.mlp = MLP(dim, hidden, mlp_bias)
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)

    def _residuals(self, x: torch.Tensor, attend) -> torch.Tensor:
        if self.swin_norm:
            h = x + self.input_layernorm(attend(x))
            return h + self.post_attention_layernorm(self.mlp(h))
        h = x + attend(self.input_layernorm(x))
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: LayerKV | None = None, present: torch.Tensor | None = None) -> torch.Tensor:
        return self._residuals(x, lambda h: self.self_attn(h, cos, sin, mask, cache, present))

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerKV) -> torch.Tensor:
        return self._residuals(x, lambda h: self.self_attn.step(h, cos, sin, cache))


class DecodeStep:
    """A model's decode step, eager or compiled: `torch.compile` (inductor) on CPU, CUDA graphs on GPU.

    The step (embedding, every layer's cache write and attention, logits) has static shapes: the
    cache is preallocated and what changes per step is either a preallocated tensor or a host number
    the compiler specialises on (a few booleans) or treats as a dynamic size (the attention width).
    On GPU the attention width is bucketed to multiples of 64 slots, so CUDA graphs are recorded for
    a handful of widths, every step attends with the occupancy mask, and the stores are marked static
    so that graphs never copy them. The step compiles to one graph per occupancy-mask state (at most
    two; tests/test_compile_readiness.py proves the bound and the absence of host synchronisation).
    Compilation happens on the first steps of the first generation (a warm-up, excluded from timing).

    On a CPU (fp32, MKL) every new cache also packs `module`'s `Linear` weights for products of as
    many rows as the cache has sequences (`pack_linears`), eager or compiled: a second copy of those
    weights in memory, for about 20% faster decode products.
    """

    RECOMPILE_LIMIT = 64  # a graph per mask state (tests/test_compile_readiness.py) x the policies of a process

    def __init__(self, step, module: nn.Module):
        self.step, self.module = step, module
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
        self.step = torch.compile(self.step, backend=backend, mode=mode, fullgraph=True, dynamic=True)
        self.compiled = True

    def new_cache(self, build, policy, key: tuple, sequences: int) -> KVCache:
        """`build(**options)` for `sequences` rows; with CUDA graphs, a kept cache, emptied, when `key` (what shapes it)
        matches. A compiled step's cache gets a spare slot (`KVCache(spare_slot=True)`: one graph for every width).

        CUDA graphs bake in the stores' addresses: reusing the stores lets the next generation replay
        the recorded graphs instead of re-recording them. `key[:2]` is (policy, budget); caches of
        another policy or budget are released first, and at most two are kept (Lumina-mGPT runs the
        conditional and the unconditional sequences in two caches), so memory follows the run.
        """
        if not self.cuda_graphs:
            pack_linears(self.module, sequences)  # CPU fp32 only; elsewhere nothing to pack
            return build(spare_slot=self.compiled)
        if key in self._caches:
            cache = self._caches[key]
            cache.reset(policy)
            return cache
        for held in [held for held in self._caches if held[:2] != key[:2]] + list(self._caches)[:-1]:
            self._caches.pop(held, None)  # release before allocating
        cache = self._caches[key] = build(spare_slot=self.compiled)
        cache.prepare_for_cuda_graphs(self.width_multiple)
        return cache

    def __call__(self, *args):
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs have been consumed
        return self.step(*args)
