"""The paper's efficiency table: full and the chosen policies, one process, the same batch and inputs.

    python run.py benchmark=efficiency model=llamagen_xl weights=random batch_size=256
    python run.py benchmark=efficiency model=llamagen_cpu weights=random batch_size=32 compile=true

For each policy (and each keep, `full` at keep=1), untimed warm-up generations (with `compile=true`
they compile the decode step; their time is recorded as `warmup_s`), then `repeats` timed generations
of the same batch (medians: see `Efficiency.summarise`), taking turns across the policies by default
(`order`), so that a slower minute of a shared machine does not land on one policy: peak memory (CUDA allocator peak, or CPU RSS
increase), KV-cache bytes, latency of the batch, throughput, speedup / memory saving against `full`,
the largest batch whose measured per-image memory fits `memory_limit_gib`, and `cores_busy` (process
CPU seconds per wall second of the timed runs: below the core count when another process took CPU
time, i.e. the timing is unreliable). Rows go to `efficiency.csv` and `metrics.json` in the run
folder, and the table is printed in the paper's layout. The wall time of every decode step goes to
`step_latency.csv` in the run folder (model, cache, keep, batch_size, step, seconds, decoding; step i =
sampling visual token i and feeding it through the model, evictions included; for speculative decoding a
step is an iteration). `benchmark.decodings=[sequential,sjd]` measures every row under each decoding
method, with its forward passes per image and committed tokens per pass (`decode_passes_per_image`,
`tokens_per_pass`) next to time and memory.
"""

from __future__ import annotations

import gc
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from lineareval.compose import group_config, policy_names
from lineareval.factory import build_budgets, build_decoding, build_policy, timed_generation
from lineareval.benchmarks.base import Benchmark
from lineareval.benchmarks.samples import Samples
from lineareval.cache import CachePolicy
from lineareval.cache.allocation import Budgets
from lineareval.decoding.decoder import StepTimer
from lineareval.keep import parse_keep
from lineareval.memory import PeakMemory, trim_heap
from lineareval.record import write_csv_atomic

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
STEP_COLUMNS = ["model", "cache", "keep", "batch_size", "step", "seconds", "decoding", "budget_allocation"]
STEP_FILE = "step_latency.csv"
ORDERS = ("interleaved", "grouped")


@dataclass
class Run:
    """One timed generation of an entry."""

    cost: dict
    step_seconds: list[float]
    cpu_seconds: float
    resident: int  # bytes the process held just before it


@dataclass
class Entry:
    """One row of the table (a decoding method and a policy at one keep and budget allocation) while it is measured."""

    name: str
    keep: str
    budget: Budgets
    policy: CachePolicy
    decoding: object = None  # a decoding method (None: the run's)
    warmup_s: float = 0.0
    runs: list[Run] = field(default_factory=list)


@dataclass
class Efficiency(Benchmark):
    """`policies`: names of conf/cache/*.yaml (None: every one); `keeps`: budgets for every policy but `full`."""

    suite = True  # runs its policies itself, in this process

    policies: list[str] | None = None  # None: every policy of conf/cache/ (lineareval.api.policy_names)
    keeps: list[str] = field(default_factory=lambda: ["1/4", "1/6"])
    warmup: int = 1
    repeats: int = 1  # timed generations per policy: medians of their times
    # "interleaved": after every entry's warm-up, round r times each entry once (a slow minute of a shared
    # machine then hits every entry alike); "grouped": one entry's warm-up and repeats, then the next.
    # With compile on CUDA the runs are grouped (each policy switch would re-record the CUDA graphs).
    order: str = "interleaved"
    prompt: str = DEFAULT_PROMPT
    memory_limit_gib: float = 16.0  # for `max_batch_at_limit`
    # explicit rows instead of policies x keeps: "full", "linear@1/6", "window@1/6", ... (the GPU report's table)
    rows: list[str] | None = None
    decodings: list[str] | None = None  # names of conf/decoding/*.yaml, each with every row (None: the run's)
    # names of conf/budget_allocation/*.yaml, each with every row (None: the run's budget_allocation)
    allocations: list[str] | None = None

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"benchmark.repeats must be >= 1 and benchmark.warmup >= 0 (got {self.repeats}, "
                             f"{self.warmup})")
        if self.order not in ORDERS:
            raise ValueError(f"benchmark.order must be one of {ORDERS}, got {self.order!r}")

    def run_suite(self, cfg, generator, device) -> list[dict]:
        if generator.conditioning == "text" and not (cfg.prompt or cfg.prompts_file):
            cfg.prompt, cfg.images_per_prompt = self.prompt, cfg.batch_size  # one prompt, a batch of images
        samples = Samples().samples(cfg, generator)
        if len(samples) < cfg.batch_size:
            raise ValueError(f"only {len(samples)} samples for batch_size={cfg.batch_size}: raise num_samples, "
                             "add prompts or images_per_prompt")
        ids, conditions = samples.batch(0, cfg.batch_size, device)
        layout, entries = generator.layout, self.entries(cfg, generator)
        progress = tqdm(total=len(entries) * (self.warmup + self.repeats), desc=f"{cfg.model.name} efficiency",
                        unit="generation")
        measure = partial(self.timed_run, cfg, generator, conditions=conditions, ids=ids, device=device,
                          progress=progress)
        warm_up = partial(self.warm_up, cfg, generator, conditions=conditions, ids=ids, device=device,
                          progress=progress)
        interleaved = self.interleaved(cfg, device)
        with progress:
            if interleaved:
                if cfg.compile:
                    torch._dynamo.reset()  # one compile cache for all entries: each warm-up adds its variants
                for entry in entries:
                    entry.warmup_s = warm_up(entry)
                for repeat in range(self.repeats):  # each round starts one entry later: none always runs first
                    for entry in entries[repeat % len(entries):] + entries[: repeat % len(entries)]:
                        entry.runs.append(measure(entry))
            else:
                for entry in entries:
                    if cfg.compile:
                        torch._dynamo.reset()  # each policy compiles afresh in its warm-up (frees older CUDA graphs)
                    entry.warmup_s = warm_up(entry)
                    entry.runs = [measure(entry) for _ in range(self.repeats)]
        rows, steps = [], []
        for entry in entries:
            row, seconds = self.summarise(entry, cfg, device, layout.num_visual)
            row["order"] = "interleaved" if interleaved else "grouped"
            log.info("%s %s keep=%s: %.2f s (warm-up %.1f s), peak %.2f GB", entry.decoding.name, entry.name, entry.keep,
                     row["generation_s"], row["warmup_s"], row["peak_memory_bytes"] / 1e9)
            label = {"model": cfg.model.name, "decoding": entry.decoding.name, "cache": entry.name, "keep": entry.keep,
                     "budget_allocation": entry.budget.name, "batch_size": cfg.batch_size}
            rows.append({**label, "visual_budget": entry.budget.visual_budget,
                         "sequences": generator.sequences(cfg.batch_size),
                         **row, **line_means(seconds, layout.line_len)})
            steps += [{**label, "step": step, "seconds": value} for step, value in enumerate(seconds)]
        write_csv_atomic(Path(cfg.run_dir) / STEP_FILE, pd.DataFrame(steps, columns=STEP_COLUMNS))
        return add_ratios(rows)

    def entries(self, cfg, generator) -> list[Entry]:
        """Every (decoding, budget allocation, policy, keep) row, each composed by Hydra as `decoding=<d>
        budget_allocation=<a> cache=<p>` would be and checked against the model before anything runs."""
        known, entries = policy_names(), []
        methods = [build_decoding(cfg.decoding)] if self.decodings is None else [
            build_decoding(group_config(cfg, "decoding", name)) for name in self.decodings]
        allocations = [cfg.get("budget_allocation")] if self.allocations is None else [
            group_config(cfg, "budget_allocation", name) for name in self.allocations]
        for method in methods:
            for allocation in allocations:
                for name, text in self.entry_specs():
                    if name not in known:
                        raise FileNotFoundError(f"benchmark.policies names {name!r}, which is not a config of "
                                                f"conf/cache/ (known: {', '.join(known)})")
                    policy = build_policy(group_config(cfg, "cache", name))
                    budgets = build_budgets(cfg, policy, generator, keep=text, allocation=allocation)
                    entries.append(Entry(name, parse_keep(text).text, budgets, policy, method))
        return entries

    def entry_specs(self) -> list[tuple[str, str]]:
        """(policy, keep) of every row: `rows` ("policy@keep"; `full` at keep 1), else policies x keeps."""
        if self.rows is None:
            policies = policy_names() if self.policies is None else self.policies
            return [(name, keep) for name in policies for keep in (["1"] if name == "full" else self.keeps)]
        specs = []
        for row in self.rows:
            name, _, keep = str(row).partition("@")
            if not keep and name != "full":
                raise ValueError(f"benchmark.rows entry {row!r} needs a keep: write it as {name}@1/6")
            specs.append((name, keep or "1"))
        return specs

    def interleaved(self, cfg, device: torch.device) -> bool:
        """Whether the timed runs take turns across entries (see `order`)."""
        if self.order == "interleaved" and cfg.compile and device.type == "cuda":
            log.info("benchmark.order=interleaved runs grouped with compile on CUDA: each policy switch would "
                     "re-record the CUDA graphs inside a timed run")
            return False
        return self.order == "interleaved"

    def warm_up(self, cfg, generator, entry: Entry, *, conditions, ids: torch.Tensor, device: torch.device,
                progress: tqdm) -> float:
        """`warmup` untimed generations (with `compile=true` they compile the step); their wall time."""
        progress.set_postfix_str(f"{entry.name} {entry.keep} warm-up")
        began = time.perf_counter()
        for _ in range(self.warmup):
            timed_generation(generator, entry.policy, entry.budget, conditions, ids, cfg.seed, device, entry.decoding)
            progress.update()
        return time.perf_counter() - began

    def timed_run(self, cfg, generator, entry: Entry, *, conditions, ids: torch.Tensor, device: torch.device,
                  progress: tqdm) -> Run:
        """One timed generation: its cost, every step's time, the process CPU time and what was resident before."""
        progress.set_postfix_str(f"{entry.name} {entry.keep}")
        release_freed_memory()
        resident = resident_bytes(device)
        timer = StepTimer(generator.layout.num_visual - 1, device)
        cpu_began = time.process_time()
        cost = timed_generation(WithTimer(generator, timer), entry.policy, entry.budget, conditions, ids, cfg.seed,
                                device, entry.decoding)[1]
        cpu_seconds = time.process_time() - cpu_began  # all threads: ~ cores x wall time when none is shared
        progress.update()
        return Run(cost, timer.seconds(), cpu_seconds, resident)

    def summarise(self, entry: Entry, cfg, device: torch.device, num_visual: int) -> tuple[dict, list[float]]:
        """An entry's cost row and step seconds from its timed runs.

        The row's `generation_s` is the median of the repeats, and each step's time the median of that
        step over the repeats (a burst of noise in one repeat does not move either); the peak memory is
        the largest of the repeats; `generation_s_spread` = (slowest - fastest) / median."""
        totals = [run.cost["generation_s"] for run in entry.runs]
        middle = entry.runs[totals.index(statistics.median_low(totals))]
        peak = max(entry.runs, key=lambda run: run.cost["peak_memory_bytes"])
        cost = {**middle.cost, "generation_s": statistics.median(totals),
                "peak_memory_bytes": peak.cost["peak_memory_bytes"]}
        seconds = [statistics.median(times) for times in zip(*(run.step_seconds for run in entry.runs))]
        resident, batch = peak.resident, cfg.batch_size
        if device.type == "cuda":  # the peak is absolute there; with CUDA graphs the caches outlive the warm-up
            retained = cost["kv_cache_capacity_bytes"] if cfg.compile and self.warmup else 0
            resident -= retained
            increase = cost["peak_memory_bytes"] - resident
        else:
            increase = cost["peak_memory_bytes"]  # already the increase over what the process held
        per_image = max(increase, 1) / batch
        cpu_seconds = sum(run.cpu_seconds for run in entry.runs)
        row = {**cost, "compile": bool(cfg.compile), "warmup_s": entry.warmup_s, "repeats": len(entry.runs),
               "generation_s_spread": (max(totals) - min(totals)) / cost["generation_s"],
               "process_cpu_s": cpu_seconds, "cores_busy": cpu_seconds / sum(totals),
               "images_per_s": batch / cost["generation_s"],
               "tokens_per_s": batch * num_visual / cost["generation_s"],
               "memory_per_image_bytes": per_image, "resident_bytes": resident,
               "max_batch_at_limit": max(0, math.floor((self.memory_limit_gib * 2**30 - resident) / per_image)),
               "memory_limit_gib": self.memory_limit_gib}
        return row, seconds


class WithTimer:
    """A generator whose `generate` (all that `timed_generation` calls) records each step's time."""

    def __init__(self, generator, timer: StepTimer):
        self.generator, self.timer = generator, timer

    def generate(self, *args, **kwargs):
        return self.generator.generate(*args, timer=self.timer, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.generator, name)


def line_means(seconds: list[float], line_len: int) -> dict:
    """Mean step time over the fifth line (tokens [4n, 5n)) and over the last line (its n - 1 decode steps)."""
    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    return {"step_s_line5": mean(seconds[4 * line_len: 5 * line_len]), "step_s_last_line": mean(seconds[1 - line_len:])}


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`), where possible.

    On CPU the peak is the RSS increase: pages that an earlier run freed but the allocator kept
    resident would be reused silently, and the next run's allocations would not show.
    """
    gc.collect()
    trim_heap()


def resident_bytes(device: torch.device) -> int:
    """What the process holds now: allocated CUDA memory, or the CPU resident set (as PeakMemory reads it)."""
    with PeakMemory(device) as memory:
        pass
    return memory.baseline_bytes


def add_ratios(rows: list[dict]) -> list[dict]:
    """Speedup and memory saving against the `full` row of the same decoding method (when present), and the
    speedup against the first `full` row (with `benchmark.decodings`: the first method's, e.g. sequential)."""
    fulls = [row for row in rows if row["cache"] == "full"]
    for row in rows:
        full = next((other for other in fulls if other.get("decoding") == row.get("decoding")), None)
        if full is not None:
            row["speedup"] = full["generation_s"] / row["generation_s"]
            row["memory_saving"] = 1 - row["peak_memory_bytes"] / full["peak_memory_bytes"]
            row["kv_saving"] = 1 - row["kv_cache_capacity_bytes"] / full["kv_cache_capacity_bytes"]
        if fulls:
            row["speedup_vs_first_full"] = fulls[0]["generation_s"] / row["generation_s"]
    return rows


def paper_table(rows: list[dict]) -> str:
    """model | method | keep | B | batch | memory | saving | latency | speedup (+ throughput)."""
    table = pd.DataFrame([{
        "model": row["model"], "method": row["cache"] + ("" if row.get("budget_allocation", "uniform") == "uniform"
                                                        else f" ({row['budget_allocation']})"),
        "keep": row["keep"], "B": row["visual_budget"],
        "batch": row["batch_size"], "memory_GB": row["peak_memory_bytes"] / 1e9,
        "saving": f"{100 * row.get('memory_saving', 0):.2f}%", "latency_s": row["generation_s"],
        "speedup": f"{row.get('speedup', 1):.2f}x", "images_per_s": row["images_per_s"]} for row in rows])
    return table.to_string(index=False, float_format=lambda value: f"{value:.3g}")
