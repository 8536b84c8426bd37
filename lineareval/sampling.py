"""Sampling with per-sample randomness: sample `i` depends only on `(seed, i)`.

Draws come from a counter-based hash of (seed, sample index, step, vocabulary entry), turned into
Gumbel noise: `argmax(logits / T + gumbel)` is an exact sample of `softmax(logits / T)` (Gumbel-max),
and no random state is shared between samples. So a sample is the same at any batch size, in any
process, and a full-cache run and a compressed run with the same seed are paired sample by sample.
Integer hashing is exact on every device; only the logits themselves depend on the hardware.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

MASK32 = 0xFFFFFFFF
LABEL_STREAM = 0x1ABE1  # the counter used for class labels; token steps use their index
MIX_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)  # lowbias32's two multiplications (after shifts of 16, then 15)
COLUMN_SALT = 0x85EBCA6B  # added to the vocabulary index before its hash


# Each sampling field: (kind, check, the accepted range as the error message states it).
SAMPLING_FIELDS = {
    "cfg_scale": ("number", lambda value: value >= 1.0, "a number >= 1 (1 = no guidance; 1.75 is LlamaGen's FID "
                  "protocol)"),
    "cfg_interval": ("integer", lambda value: value >= -1, "an integer >= -1 (-1 = guidance for every token, n = "
                     "for the first n + 1 tokens)"),
    "temperature": ("number", lambda value: value > 0.0, "a number > 0 (1 = the model's distribution; for "
                    "greedy decoding use top_k=1)"),
    "top_k": ("integer", lambda value: value >= 0, "an integer >= 0 (0 = off, 1 = greedy)"),
    "top_p": ("number", lambda value: 0.0 < value <= 1.0, "a number in (0, 1] (1 = off; for greedy decoding use "
              "top_k=1)"),
}


def check_sampling_field(name: str, value) -> None:
    """Raise a ValueError stating the accepted range unless `value` is valid for sampling field `name`."""
    if name not in SAMPLING_FIELDS:
        raise ValueError(f"sampling.{name} is not a sampling field; the fields are {', '.join(SAMPLING_FIELDS)}")
    kind, check, accepted = SAMPLING_FIELDS[name]
    # bool is an int in Python, and a NaN passes no comparison but must not pass as valid either
    typed = isinstance(value, int if kind == "integer" else (int, float)) and not isinstance(value, bool)
    if not typed or not math.isfinite(value) or not check(value):
        raise ValueError(f"sampling.{name} must be {accepted}, got {value!r}")


@dataclass
class SamplingConfig:
    """Official LlamaGen sampling knobs (`cfg_interval=-1` keeps guidance on for every token).

    Every field is checked on construction: an out-of-range value would otherwise be used silently in
    another meaning (top_k=-5 as 0, temperature=0 as 1e-5, cfg_scale=-1 as no guidance).
    """

    cfg_scale: float = 1.75
    cfg_interval: int = -1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        for name in SAMPLING_FIELDS:
            check_sampling_field(name, getattr(self, name))

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 1.0

    def guidance_at(self, token_index: int) -> bool:
        """Whether token `token_index` (0 = first visual token) is sampled with guidance."""
        return self.guided and (self.cfg_interval < 0 or token_index - 1 <= self.cfg_interval)


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 without overflowing int64 (16-bit halves)."""
    low, high = x & 0xFFFF, x >> 16
    return (low * constant + ((high * (constant & 0xFFFF)) << 16)) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32) applied elementwise to int64 values in [0, 2**32)."""
    first, second = MIX_MULTIPLIERS
    x = x & MASK32
    x = _mul32(x ^ (x >> 16), first)
    x = _mul32(x ^ (x >> 15), second)
    return x ^ (x >> 16)


def _mix_int(value: int) -> int:
    """`_mix32` of one Python integer, in Python arithmetic (exact; no tensor, so no graph break)."""
    first, second = MIX_MULTIPLIERS
    x = value & MASK32
    x = ((x ^ (x >> 16)) * first) & MASK32
    x = ((x ^ (x >> 15)) * second) & MASK32
    return x ^ (x >> 16)


def stream_keys(seed: int, counter: int) -> tuple[int, int]:
    """The hashed (seed, counter) pair that `keyed_bits` mixes into every sample's row."""
    return _mix_int(seed), _mix_int(counter + 0x9E3779B9)


SPECULATIVE_SALT = 0x3C6EF372  # speculative decoding's streams: (position, iteration, purpose) instead of a token index


def speculative_keys(seed: int, positions: torch.Tensor, iteration: int, purpose: int) -> tuple[int, torch.Tensor]:
    """Keys of the draws speculative decoding makes at visual positions (R,) in `iteration` for `purpose` (draft,
    acceptance, residual): (seed key, (R,) counter keys). Each draw of a sample is keyed by (seed, sample,
    position, iteration, purpose) alone, so it does not depend on the batch or the process."""
    counters = [_mix_int(_mix_int(4 * int(position) + purpose + SPECULATIVE_SALT) ^ (iteration & MASK32))
                for position in positions.reshape(-1).tolist()]
    return _mix_int(seed), torch.tensor(counters, dtype=torch.long, device=positions.device).view(positions.shape)


def keyed_bits(sample_ids: torch.Tensor, seed_key: int, counter_key: int | torch.Tensor, width: int) -> torch.Tensor:
    """32 random bits per (sample, column) for the keys of `stream_keys` (or a counter key per sample, (B,)).
    -> (B, width) int64."""
    if _on_host(sample_ids):
        return torch.from_numpy(_host_bits(sample_ids, seed_key, counter_key, width).astype(np.int64))
    row, columns = _row_hash(sample_ids, seed_key, counter_key), _column_hash(width, sample_ids.device)
    return _mix32(row[:, None] ^ columns[None, :])


def _row_hash(sample_ids: torch.Tensor, seed_key: int, counter_key: int | torch.Tensor) -> torch.Tensor:
    """Each sample's hash under the stream keys. (B,) -> (B,) int64 in [0, 2**32)."""
    return _mix32(_mix32(sample_ids.long() ^ seed_key) ^ counter_key)


def _column_hash(width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Each vocabulary column's hash. -> (width,) int64 in [0, 2**32)."""
    return _mix32(torch.arange(width, device=device) + COLUMN_SALT)


def _on_host(sample_ids: torch.Tensor) -> bool:
    """Eager CPU work: the hash runs in numpy uint32 (compiled code and GPUs use the int64 tensor hash)."""
    return sample_ids.device.type == "cpu" and not torch.compiler.is_compiling()


@functools.lru_cache(maxsize=8)
def _host_columns(width: int) -> np.ndarray:
    return _column_hash(width).numpy().astype(np.uint32)


def _host_bits(sample_ids: torch.Tensor, seed_key: int, counter_key: int, width: int) -> np.ndarray:
    """`keyed_bits` as numpy uint32, whose products wrap modulo 2**32 by definition: the same bits as
    the int64 tensor hash, about eight times faster on a CPU (no 16-bit halves, half the bytes)."""
    first, second = (np.uint32(multiplier) for multiplier in MIX_MULTIPLIERS)
    row = _row_hash(sample_ids, seed_key, counter_key).numpy().astype(np.uint32)  # (B,)
    x = row[:, None] ^ _host_columns(width)[None, :]  # the last mix, in place
    x ^= x >> 16
    x *= first
    x ^= x >> 15
    x *= second
    x ^= x >> 16
    return x


def counter_bits(seed: int, sample_ids: torch.Tensor, counter: int, width: int) -> torch.Tensor:
    """32 random bits per (sample, column) from the key (seed, sample, counter). -> (B, width) int64."""
    return keyed_bits(sample_ids, *stream_keys(seed, counter), width)


def keyed_uniform(sample_ids: torch.Tensor, seed_key: int, counter_key: int | torch.Tensor, width: int) -> torch.Tensor:
    """Uniform noise in (0, 1), (B, width) float32, from the top 24 bits of `keyed_bits` (exact in float32)."""
    if _on_host(sample_ids):  # the top 24 bits are exact in float32 either way
        high = torch.from_numpy((_host_bits(sample_ids, seed_key, counter_key, width) >> 8).astype(np.float32))
    else:
        high = (keyed_bits(sample_ids, seed_key, counter_key, width) >> 8).float()
    return high.add_(0.5).div_(2**24)


def keyed_gumbel(sample_ids: torch.Tensor, seed_key: int, counter_key: int | torch.Tensor, width: int) -> torch.Tensor:
    """Standard Gumbel noise (B, width), float32: -log(-log(u)) of `keyed_uniform`'s u, in place."""
    return keyed_uniform(sample_ids, seed_key, counter_key, width).log_().neg_().log_().neg_()


def class_labels(seed: int, sample_ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Uniform class label of each sample, a function of (seed, sample index) only. (B,) -> (B,)."""
    return counter_bits(seed, sample_ids, LABEL_STREAM, 1)[:, 0] % num_classes


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus filtering with the official semantics (filtered entries become -inf). (B, V)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the first token above the threshold
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def target_probabilities(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """The distribution `draw_tokens` samples from: softmax of the tempered, top-k / top-p filtered logits.
    (..., V) float -> (..., V) float32."""
    if config.temperature != 1.0:
        logits = logits / config.temperature
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return torch.softmax(filter_logits(flat, config.top_k, config.top_p), dim=-1).view(logits.shape)


def sample_tokens(logits: torch.Tensor, config: SamplingConfig, seed: int, sample_ids: torch.Tensor,
                  token_index: int) -> torch.Tensor:
    """Draw token `token_index` for each sample. logits (B, V) float -> (B,) int64."""
    return draw_tokens(logits, config, sample_ids, *stream_keys(seed, token_index))


def draw_tokens(logits: torch.Tensor, config: SamplingConfig, sample_ids: torch.Tensor, seed_key: int,
                counter_key: int) -> torch.Tensor:
    """`sample_tokens` for the keys of `stream_keys(seed, token_index)`: tensor work only, one compiled graph."""
    if config.temperature != 1.0:
        logits = logits / max(config.temperature, 1e-5)
    logits = filter_logits(logits, config.top_k, config.top_p)
    if config.top_k == 1:
        return logits.argmax(dim=-1)
    return (logits + keyed_gumbel(sample_ids, seed_key, counter_key, logits.shape[-1])).argmax(dim=-1)
