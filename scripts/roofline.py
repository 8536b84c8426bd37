"""Roofline of LlamaGen decoding: the time the machine's compute and memory bandwidth allow, beside the measured time.

    python scripts/roofline.py RUN_DIR [RUN_DIR ...] [--out results/roofline.csv]

Each RUN_DIR is a finished `benchmark=efficiency` run of a LlamaGen model (its config.yaml, efficiency.csv
and step_latency.csv). For every policy row the script counts, per decode step, the floating-point
operations and the bytes that must move between memory and the cores:

- weights: every matrix of every layer plus the output head read once per step (they do not fit in
  cache), the embedding rows of the S tokens;
- KV cache: keys and values of the attended slots read (the width the engine attends over, step by
  step, from the engine's own bookkeeping run on a one-slot-wide cache), the new key and value written,
  the occupancy mask read when attention is masked; H2O's explicit probabilities and accumulated
  scores, LineAR's line-end attention (amortised over its line);
- logits: written in fp32 and read back once by guidance and sampling.

FLOPs are the matrix products (2 per multiply-add) and attention (QK^T and PV); norms, RoPE, softmax
and sampling are left out (a few per cent). It measures this machine's matrix-product FLOP/s (a large
square product and one at the model's shape, S x dim @ dim x ffn) and memory bandwidth (read: a sum;
copy: read + write; the better of the two is the bound) in the run's dtype. Three bounds per step,
each summed over the decode steps:

- `bound_s`, the roofline: max(FLOPs / FLOP/s, bytes / bandwidth) with the square product's FLOP/s,
  as if the weight products (compute-bound) and the cache reads (memory-bound) overlapped perfectly;
  `bound_at_model_shape_s` likewise with the FLOP/s measured at the model's own matrix shape;
- `serial_bound_s`: each kind of kernel at its own roofline, one after the other (the step's weight
  products, then attention over the cache, then the logits), since each layer's attention needs its
  products' output and vice versa;
- `floor_s`: this machine's own products, measured: the step's weight matrices (distinct ones, read
  from memory as in decoding, packed as our CPU decode packs them) multiplied in order by S rows, plus
  the cache and logits bytes at full bandwidth. No implementation of the same products and attention
  on this machine and library is faster than that, short of a better matrix-product library.

Rows are printed and written to `--out` (one per run row): the bounds over the decode steps, measured
seconds of the same steps, and `fraction_of_bound` = bound / measured (1 = at the roofline), likewise
`fraction_of_serial_bound` and `fraction_of_floor`. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf

from lineareval.cache import KVCache, ScoreNeed
from lineareval.config import call_target
from lineareval.keep import parse_keep
from lineareval.models.layers import Linear, pack_linears
from lineareval.models.llamagen import LlamaGenConfig
from lineareval.record import environment_info, load_record

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


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


def step_products(config: LlamaGenConfig, rows: int, device: torch.device, dtype: torch.dtype):
    """One decode step's weight products, as the model runs them: every layer's wqkv, wo, w1, w3, w2 and
    the output head, distinct random matrices (so they stream from memory as real weights do), packed
    for `rows` rows where our CPU decode packs them. Returns a function doing them all once."""
    dim, hidden = config.dim, config.ffn_hidden
    shapes = [(dim, 3 * dim), (dim, dim), (dim, hidden), (dim, hidden), (hidden, dim)] * config.n_layer
    linears = torch.nn.ModuleList(Linear(inputs, outputs, bias=False) for inputs, outputs in
                                  shapes + [(dim, config.vocab_size)]).to(device=device, dtype=dtype)
    pack_linears(linears, rows)
    inputs = {size: torch.randn(rows, size, dtype=dtype, device=device) for size in (dim, hidden)}

    @torch.inference_mode()
    def run() -> None:
        for linear in linears:
            linear(inputs[linear.in_features])
    return run


def peak_rates(device: torch.device, dtype: torch.dtype, rows: int, dim: int, hidden: int) -> tuple[float, ...]:
    """Matrix-product FLOP/s (square 4096 and rows x dim x hidden), memory read and copy bytes/s."""
    size = 4096
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    square = 2 * size**3 / best_time(lambda: torch.mm(a, b), device)
    x, w = torch.randn(rows, dim, dtype=dtype, device=device), torch.randn(dim, hidden, dtype=dtype, device=device)
    shaped = 2 * rows * dim * hidden / best_time(lambda: torch.mm(x, w), device, repeats=50)
    big = torch.ones(256 * 2**20, dtype=torch.float32, device=device)  # 1 GiB: far beyond any cache
    out = torch.empty_like(big)
    read = big.numel() * 4 / best_time(lambda: big.sum(), device)
    copy = 2 * big.numel() * 4 / best_time(lambda: out.copy_(big), device)
    return square, shaped, read, copy


def measure_machine(device: torch.device, dtype: torch.dtype, rows: int, config: LlamaGenConfig) -> Machine:
    """Peak rates, and the time of one decode step's weight products at this model's shapes."""
    rates = peak_rates(device, dtype, rows, config.dim, config.ffn_hidden)
    products = best_time(step_products(config, rows, device, dtype), device, repeats=10)
    return Machine(*rates, products)


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
        cache.end_step()
    return widths


def step_work(config: LlamaGenConfig, sequences: int, element: int, width: int, masked: bool, needs: ScoreNeed,
              line_end: bool) -> StepWork:
    """Work of one decode step of S sequences attending over `width` slots."""
    dim, hidden, layers, heads, head_dim = config.dim, config.ffn_hidden, config.n_layer, config.n_head, config.head_dim
    vocab, n = config.vocab_size, config.grid
    layer_params = 4 * dim * dim + 3 * dim * hidden
    flops = 2 * sequences * (layers * layer_params + vocab * dim)
    weight_bytes = element * (layers * (layer_params + 2 * dim) + vocab * dim + dim + sequences * dim)
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


def policy_for(name: str):
    return call_target(OmegaConf.load(CONF_DIR / "cache" / f"{name}.yaml"), exclude=("name",))


def roofline_rows(run_dir: Path, machine_for) -> list[dict]:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if not str(model.get("_target_", "")).startswith("lineareval.generators.llamagen"):
        raise SystemExit(f"{run_dir}: the roofline counts LlamaGen models only (got {model.get('name')})")
    config = LlamaGenConfig(**{f.name: model[f.name] for f in fields(LlamaGenConfig) if f.name in model})
    record = load_record(run_dir / "metrics.json")
    table = pd.read_csv(run_dir / "efficiency.csv", dtype={"keep": str})
    steps = pd.read_csv(run_dir / "step_latency.csv", dtype={"keep": str})
    dtype, device = getattr(torch, record["dtype"]), torch.device(record["device"])
    element = torch.finfo(dtype).bits // 8
    rows = []
    for row in table.itertuples():
        sequences = int(row.sequences)
        machine = machine_for(device, dtype, sequences, config)
        policy = policy_for(row.cache)
        budget = parse_keep(row.keep).budget(config.layout.num_visual)
        work = [step_work(config, sequences, element, width, masked, policy.needs_scores, line_end)
                for width, masked, line_end in attended_widths(policy, config.layout, budget)]
        compute = sum(step.flops for step in work) / machine.matmul_flops
        memory = sum(step.bytes for step in work) / machine.bandwidth
        bound = sum(step.bound(machine.matmul_flops, machine.bandwidth) for step in work)
        shaped = sum(step.bound(machine.model_shape_flops, machine.bandwidth) for step in work)
        serial = sum(step.serial_bound(machine.matmul_flops, machine.bandwidth) for step in work)
        floor = sum(step.floor(machine.step_products_s, machine.bandwidth) for step in work)
        measured = steps[(steps.cache == row.cache) & (steps.keep == row.keep)].seconds.sum()
        rows.append({"model": row.model, "cache": row.cache, "keep": row.keep, "batch_size": row.batch_size,
                     "sequences": sequences, "compile": bool(getattr(row, "compile", False)),
                     "dtype": str(dtype).removeprefix("torch."), "device_name": row.device_name,
                     "steps": len(work), "gflop_per_step": sum(s.flops for s in work) / len(work) / 1e9,
                     "mb_per_step": sum(s.bytes for s in work) / len(work) / 1e6,
                     "compute_bound_s": compute, "memory_bound_s": memory, "bound_s": bound,
                     "bound_at_model_shape_s": shaped, "serial_bound_s": serial, "floor_s": floor,
                     "measured_decode_s": measured, "measured_generation_s": row.generation_s,
                     "fraction_of_bound": bound / measured, "fraction_of_model_shape_bound": shaped / measured,
                     "fraction_of_serial_bound": serial / measured, "fraction_of_floor": floor / measured,
                     "step_products_ms": machine.step_products_s * 1e3,
                     "matmul_gflops": machine.matmul_flops / 1e9,
                     "model_shape_gflops": machine.model_shape_flops / 1e9,
                     "bandwidth_gbs": machine.bandwidth / 1e9, "run_dir": str(run_dir)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("results") / "roofline.csv")
    args = parser.parse_args()
    machines: dict[tuple, Machine] = {}

    def machine_for(device, dtype, rows, config) -> Machine:
        key = (device, dtype, rows, repr(config))
        if key not in machines:
            machines[key] = measure_machine(device, dtype, rows, config)
            machine = machines[key]
            print(f"machine ({environment_info(device)['device_name']}, {dtype}): matrix product "
                  f"{machine.matmul_flops / 1e9:.1f} GFLOP/s (4096^3), {machine.model_shape_flops / 1e9:.1f} GFLOP/s "
                  f"({rows}x{config.dim}x{config.ffn_hidden}); memory read {machine.read_bandwidth / 1e9:.1f} GB/s, "
                  f"copy {machine.copy_bandwidth / 1e9:.1f} GB/s; one step's weight products "
                  f"{machine.step_products_s * 1e3:.1f} ms")
        return machines[key]

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
