"""Roofline of decoding: the time the device's compute and memory bandwidth allow, beside the measured time.

    python scripts/roofline.py RUN_DIR [RUN_DIR ...] [--out results/roofline.csv]

Each RUN_DIR is a finished `benchmark=efficiency` run (its config.yaml, efficiency.csv and
step_latency.csv) of a LlamaGen, Janus-Pro or Lumina-mGPT model, on a CPU or a GPU. The model is built
on PyTorch's meta device (no memory, no weights) to count, per decode step, the floating-point
operations and the bytes that must move between memory and the cores:

- weights: every matrix of the decode path (each layer, Janus's image aligner and head, the output
  head) and every other parameter (norms, biases) read once per forward pass, the embedding rows of
  the S tokens. Lumina-mGPT runs its unconditional CFG context in a second cache, so it makes two
  forward passes per token and reads the weights twice;
- KV cache: keys and values of the attended slots read (the width the engine attends over, step by
  step, from the engine's own bookkeeping run on a one-slot-wide cache), the new key and value written,
  the occupancy mask read when attention is masked; H2O's explicit probabilities and accumulated
  scores, LineAR's line-end attention (amortised over its line);
- logits: written in fp32 and read back once by guidance and sampling.

FLOPs are the matrix products (2 per multiply-add) and attention (QK^T and PV); norms, RoPE, softmax
and sampling are left out (a few per cent). It measures the device's matrix-product FLOP/s (a large
square product and one at the model's shape, S x dim @ dim x ffn) and memory bandwidth (read: a sum;
copy: read + write; the better of the two is the bound) in the run's dtype (bf16 on GPU). Three bounds
per step, each summed over the decode steps:

- `bound_s`, the roofline: max(FLOPs / FLOP/s, bytes / bandwidth) with the square product's FLOP/s,
  as if the weight products (compute-bound) and the cache reads (memory-bound) overlapped perfectly;
  `bound_at_model_shape_s` likewise with the FLOP/s measured at the model's own matrix shape;
- `serial_bound_s`: each kind of kernel at its own roofline, one after the other (the step's weight
  products, then attention over the cache, then the logits), since each layer's attention needs its
  products' output and vice versa;
- `floor_s`: this device's own products, measured: the step's weight matrices (distinct ones, read
  from memory as in decoding, packed as our CPU decode packs them) multiplied in order by the rows of
  one forward pass, once per pass, plus the cache and logits bytes at full bandwidth. No
  implementation of the same products and attention on this device and library is faster than that,
  short of a better matrix-product library.

Rows are printed and written to `--out` (one per run row): the bounds over the decode steps, measured
seconds of the same steps, and `fraction_of_bound` = bound / measured (1 = at the roofline), likewise
`fraction_of_serial_bound` and `fraction_of_floor`. Timings on a shared machine are noisy. The cache
traffic counts every cache at the run's longest prefix (`prefix_len`; Lumina's unconditional prefix
is 3 tokens: a few dozen slots too many of its ~2,400, under 2%).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf

from lineareval.compose import policy_config
from lineareval.factory import build_policy
from lineareval.cache import KVCache, ScoreNeed, TokenLayout
from lineareval.keep import parse_keep
from lineareval.models.packed import Linear, pack_linears
from lineareval.record import SuiteRecord, environment_info

@dataclass
class Machine:
    """Measured peak rates: FLOP/s of matrix products, bytes/s of memory traffic; and the seconds of one
    decode step's weight products (S rows, every matrix of the model once, weights streamed from memory)."""

    matmul_flops: float
    model_shape_flops: float
    read_bandwidth: float
    copy_bandwidth: float
    step_products_s: float

    @property
    def bandwidth(self) -> float:
        return max(self.read_bandwidth, self.copy_bandwidth)


def best_time(work, device: torch.device, repeats: int = 5) -> float:
    """Fastest of `repeats` runs (after one warm-up), synchronised on GPU."""
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    work()
    times = []
    for _ in range(repeats):
        synchronize()
        began = time.perf_counter()
        work()
        synchronize()
        times.append(time.perf_counter() - began)
    return min(times)


@dataclass
class DecodeShape:
    """What one decode step of a model reads and multiplies, counted from the module itself.

    `linears` are the (in, out) sizes of every matrix applied to each token of a forward pass, in order
    (the output head last); `other_params` the decode path's other parameters (norms, biases, q/k norms);
    `embedding_dims` the width of each embedding row a token reads; `passes` the forward passes per
    token (2 where the unconditional CFG context runs in its own cache, as Lumina-mGPT's does).
    """

    layers: int
    heads: int
    head_dim: int
    linears: list[tuple[int, int]]
    other_params: int
    embedding_dims: list[int]
    layout: TokenLayout  # the prefix is the longest of the run's caches
    passes: int = 1

    @property
    def linear_params(self) -> int:
        return sum(inputs * outputs for inputs, outputs in self.linears)

    @property
    def vocab(self) -> int:
        return self.linears[-1][1]


def _counted(modules: list[torch.nn.Module], embeddings: list[torch.nn.Embedding]) -> tuple[list, int, list]:
    """(linear sizes, other parameter count, embedding widths) of the decode path's modules."""
    linears = [module for root in modules for module in root.modules() if isinstance(module, torch.nn.Linear)]
    weights = {id(linear.weight) for linear in linears}
    other = sum(p.numel() for root in modules for p in root.parameters() if id(p) not in weights)
    return [(linear.in_features, linear.out_features) for linear in linears], other, [e.embedding_dim for e in embeddings]


def decode_shape(model: dict, prefix_len: int, guided: bool) -> DecodeShape:
    """A model's `DecodeShape` from its resolved `conf/model/*.yaml` block, built on the meta device."""
    target = str(model.get("_target_", ""))
    with torch.device("meta"):
        if target.startswith("lineareval.generators.llamagen"):
            from lineareval.models.llamagen import LlamaGen, LlamaGenConfig

            gpt = LlamaGen(LlamaGenConfig(**{f.name: model[f.name] for f in fields(LlamaGenConfig) if f.name in model}))
            counted = _counted([gpt.layers, gpt.norm, gpt.output], [gpt.tok_embeddings])
            config = gpt.config
            return DecodeShape(config.n_layer, config.n_head, config.head_dim, *counted,
                               TokenLayout(prefix_len, config.grid, config.grid))
        if target.startswith("lineareval.generators.janus"):
            from lineareval.models.janus import JanusGenConfig, JanusImageLM
            from lineareval.models.llama import LlamaConfig

            network = JanusImageLM(LlamaConfig(**model["text"]), JanusGenConfig(**model["gen"]))
            lm = network.language_model
            counted = _counted([lm.layers, lm.norm, network.generation_aligner, network.generation_head],
                               [network.generation_embeddings])
            side = network.gen_config.num_patches
            return DecodeShape(len(lm.layers), lm.config.num_attention_heads, lm.config.head_dim, *counted,
                               TokenLayout(prefix_len, side, side))
        if target.startswith("lineareval.generators.lumina"):
            from lineareval.models.chameleon import ChameleonLM, ChameleonLMConfig

            network = ChameleonLM(ChameleonLMConfig(**model["lm"]))
            counted = _counted([network.model.layers, network.model.norm, network.lm_head], [network.model.embed_tokens])
            side, config = model["resolution"] // 16, network.config
            return DecodeShape(config.num_hidden_layers, config.num_attention_heads, config.head_dim, *counted,
                               TokenLayout(prefix_len, side, side + 1), passes=2 if guided else 1)
    raise SystemExit(f"the roofline counts LlamaGen, Janus-Pro and Lumina-mGPT models (got {model.get('name')})")


def step_products(shape: DecodeShape, rows: int, device: torch.device, dtype: torch.dtype):
    """One forward pass's weight products, as the model runs them: every matrix of the decode path,
    distinct random ones (so they stream from memory as real weights do), packed for `rows` rows where
    our CPU decode packs them. Returns a function doing them all once."""
    linears = torch.nn.ModuleList(Linear(inputs, outputs, bias=False) for inputs, outputs in shape.linears)
    linears = linears.to(device=device, dtype=dtype)
    pack_linears(linears, rows)
    inputs = {size: torch.randn(rows, size, dtype=dtype, device=device) for size, _ in shape.linears}

    @torch.inference_mode()
    def run() -> None:
        for linear in linears:
            linear(inputs[linear.in_features])
    return run


def peak_rates(device: torch.device, dtype: torch.dtype, rows: int, dim: int, hidden: int, size: int = 4096,
               stream_mib: int = 1024) -> tuple[float, ...]:
    """Matrix-product FLOP/s (square `size` and rows x dim x hidden), memory read and copy bytes/s (`stream_mib`
    of fp32, far beyond any cache at the default)."""
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    square = 2 * size**3 / best_time(lambda: torch.mm(a, b), device)
    x, w = torch.randn(rows, dim, dtype=dtype, device=device), torch.randn(dim, hidden, dtype=dtype, device=device)
    shaped = 2 * rows * dim * hidden / best_time(lambda: torch.mm(x, w), device, repeats=50)
    big = torch.ones(stream_mib * 2**18, dtype=torch.float32, device=device)
    out = torch.empty_like(big)
    read = big.numel() * 4 / best_time(lambda: big.sum(), device)
    copy = 2 * big.numel() * 4 / best_time(lambda: out.copy_(big), device)
    return square, shaped, read, copy


def measure_machine(device: torch.device, dtype: torch.dtype, rows: int, shape: DecodeShape, size: int = 4096,
                    stream_mib: int = 1024) -> Machine:
    """Peak rates, and the time of one decode step's weight products (every pass) at this model's shapes."""
    dim, hidden = max(shape.linears, key=lambda sizes: sizes[0] * sizes[1])  # the largest matrix: the FFN's
    rates = peak_rates(device, dtype, rows, dim, hidden, size, stream_mib)
    products = best_time(step_products(shape, rows, device, dtype), device, repeats=10)
    return Machine(*rates, shape.passes * products)


@dataclass
class StepWork:
    """FLOPs and bytes of one decode step: weight products, attention over the cache, logits."""

    product_flops: float
    weight_bytes: float
    attention_flops: float
    cache_bytes: float
    logits_bytes: float

    @property
    def flops(self) -> float:
        return self.product_flops + self.attention_flops

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.cache_bytes + self.logits_bytes

    def bound(self, flops: float, bandwidth: float) -> float:
        """Products and memory traffic perfectly overlapped."""
        return max(self.flops / flops, self.bytes / bandwidth)

    def serial_bound(self, flops: float, bandwidth: float) -> float:
        """Each kernel kind at its own roofline, one after the other."""
        return (max(self.product_flops / flops, self.weight_bytes / bandwidth)
                + max(self.attention_flops / flops, self.cache_bytes / bandwidth) + self.logits_bytes / bandwidth)

    def floor(self, products_s: float, bandwidth: float) -> float:
        """The machine's measured products, then the cache and logits traffic at full bandwidth."""
        return products_s + (self.cache_bytes + self.logits_bytes) / bandwidth


def attended_widths(policy, layout, budget: int) -> list[tuple[int, bool, bool]]:
    """(width, masked, scored_line) per decode step, from the engine's bookkeeping on a one-slot cache."""
    cache = KVCache(policy, layout, budget, num_layers=1, sequences=1, heads=1, head_dim=1, dtype=torch.float32,
                    device="cpu")
    layer = cache.layers[0]
    zeros = torch.zeros(1, 1, 1, 1)
    cache.begin_prefix()
    widths = []
    for index in range(layout.num_visual - 1):
        cache.begin_step(index)
        layer.append(zeros, zeros)
        widths.append((cache.state.width, cache.state.masked, layout.is_line_end(index)))
        cache.commit()
    return widths


def step_work(shape: DecodeShape, sequences: int, element: int, width: int, masked: bool, needs: ScoreNeed,
              line_end: bool) -> StepWork:
    """Work of one decode step of S sequences (over all forward passes) attending over `width` slots."""
    layers, heads, head_dim, vocab, n = shape.layers, shape.heads, shape.head_dim, shape.vocab, shape.layout.line_len
    flops = 2 * sequences * shape.linear_params
    weight_bytes = element * (shape.passes * (shape.linear_params + shape.other_params)
                              + sequences * sum(shape.embedding_dims))
    kv_slot = sequences * heads * head_dim * element  # one slot of keys (or values), all sequences and heads
    attention_flops = 4 * sequences * heads * width * head_dim
    kv_bytes = 2 * kv_slot * width + 2 * kv_slot + (sequences * heads * width if masked else 0)
    if needs is ScoreNeed.EVERY_STEP:  # probabilities written and read, received read and written (fp32)
        kv_bytes += 4 * 4 * sequences * heads * width
    if needs is ScoreNeed.LINE_END and line_end:  # n queries against the keys, fp32 probabilities
        attention_flops += 2 * sequences * heads * n * width * head_dim
        kv_bytes += kv_slot * width + 2 * 4 * sequences * heads * n * width
    logits_bytes = 2 * 4 * sequences * vocab
    return StepWork(flops, weight_bytes, layers * attention_flops, layers * kv_bytes, logits_bytes)


def roofline_rows(run_dir: Path, machine_for) -> list[dict]:
    """One row per row of the run's efficiency.csv: the bounds of its decode steps beside their measured time."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    model = OmegaConf.to_container(cfg.model, resolve=True)
    guided = float(OmegaConf.select(cfg, "sampling.cfg_scale", default=1.0)) > 1.0
    record = SuiteRecord.load(run_dir)
    table = pd.read_csv(run_dir / "efficiency.csv", dtype={"keep": str})
    steps = pd.read_csv(run_dir / "step_latency.csv", dtype={"keep": str})
    dtype, device = getattr(torch, record.dtype), torch.device(record.device)
    element = torch.finfo(dtype).bits // 8
    rows = []
    for row in table.itertuples():
        prefix = int(getattr(row, "prefix_len", 1))  # runs before prefix_len was recorded: LlamaGen's class token
        shape = decode_shape(model, prefix, guided)
        sequences = int(row.sequences)
        machine = machine_for(device, dtype, sequences // shape.passes, shape)
        policy = build_policy(policy_config(cfg, row.cache))  # composed by Hydra in the run's config
        budget = parse_keep(row.keep).budget(shape.layout.num_visual)
        work = [step_work(shape, sequences, element, width, masked, policy.needs_scores, line_end)
                for width, masked, line_end in attended_widths(policy, shape.layout, budget)]
        measured = steps[(steps.cache == row.cache) & (steps.keep == row.keep)].seconds.sum()
        rows.append({"model": row.model, "cache": row.cache, "keep": row.keep, "batch_size": row.batch_size,
                     "sequences": sequences, "compile": bool(getattr(row, "compile", False)),
                     "dtype": str(dtype).removeprefix("torch."), "device_name": row.device_name,
                     **bounds(work, machine, measured), "measured_generation_s": row.generation_s,
                     "run_dir": str(run_dir)})
    return rows


def bounds(work: list[StepWork], machine: Machine, measured: float) -> dict:
    """The bounds summed over the steps, and each as a fraction of the measured seconds of those steps."""
    bound = sum(step.bound(machine.matmul_flops, machine.bandwidth) for step in work)
    shaped = sum(step.bound(machine.model_shape_flops, machine.bandwidth) for step in work)
    serial = sum(step.serial_bound(machine.matmul_flops, machine.bandwidth) for step in work)
    floor = sum(step.floor(machine.step_products_s, machine.bandwidth) for step in work)
    return {"steps": len(work), "gflop_per_step": sum(s.flops for s in work) / len(work) / 1e9,
            "mb_per_step": sum(s.bytes for s in work) / len(work) / 1e6,
            "compute_bound_s": sum(step.flops for step in work) / machine.matmul_flops,
            "memory_bound_s": sum(step.bytes for step in work) / machine.bandwidth, "bound_s": bound,
            "bound_at_model_shape_s": shaped, "serial_bound_s": serial, "floor_s": floor,
            "measured_decode_s": measured, "fraction_of_bound": bound / measured,
            "fraction_of_model_shape_bound": shaped / measured, "fraction_of_serial_bound": serial / measured,
            "fraction_of_floor": floor / measured, "step_products_ms": machine.step_products_s * 1e3,
            "matmul_gflops": machine.matmul_flops / 1e9, "model_shape_gflops": machine.model_shape_flops / 1e9,
            "bandwidth_gbs": machine.bandwidth / 1e9}


class Machines:
    """`measure_machine` once per (device, dtype, rows, model shape), logged as it is measured. `square` and
    `stream_mib` size the peak-rate probes (smaller ones only for quick dry runs)."""

    def __init__(self, square: int = 4096, stream_mib: int = 1024):
        self.measured: dict[tuple, Machine] = {}
        self.square, self.stream_mib = square, stream_mib

    def __call__(self, device: torch.device, dtype: torch.dtype, rows: int, shape: DecodeShape) -> Machine:
        key = (device, dtype, rows, repr(shape))
        if key not in self.measured:
            machine = self.measured[key] = measure_machine(device, dtype, rows, shape, self.square, self.stream_mib)
            print(f"machine ({environment_info(device)['device_name']}, {dtype}): matrix product "
                  f"{machine.matmul_flops / 1e9:.1f} GFLOP/s (4096^3), {machine.model_shape_flops / 1e9:.1f} "
                  f"GFLOP/s at the model's largest matrix x {rows} rows; memory read "
                  f"{machine.read_bandwidth / 1e9:.1f} GB/s, copy {machine.copy_bandwidth / 1e9:.1f} GB/s; one "
                  f"step's weight products {machine.step_products_s * 1e3:.2f} ms", flush=True)
        return self.measured[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("results") / "roofline.csv")
    args = parser.parse_args()
    machine_for = Machines()
    rows = [row for run_dir in args.run_dirs for row in roofline_rows(run_dir, machine_for)]
    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    shown = ["cache", "keep", "compile", "gflop_per_step", "mb_per_step", "compute_bound_s", "memory_bound_s",
             "bound_s", "serial_bound_s", "floor_s", "measured_decode_s", "fraction_of_bound",
             "fraction_of_serial_bound", "fraction_of_floor"]
    print(table[shown].to_string(index=False, float_format=lambda value: f"{value:.3g}"))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
