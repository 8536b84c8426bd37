"""The runner: conditions from the benchmark, samples from the generator under a policy, one record.

Run folder contents: `config.yaml` (resolved), `tokens.npz` (`tokens` [n, N] plus `labels` [n] or
`prompts`, `prompt_index`, `image_index`),
`samples.npz` (ADM layout: `arr_0` uint8 [n, H, W, 3]), `samples.png` (a grid of the first samples),
and `metrics.json`, written last: its presence marks the run finished.

Sampling goes batch by batch into `shards/` (lineareval/shards.py), so an interrupted run resumes with
the missing batches only, and `torchrun --nproc_per_node=K run.py ...` splits the batches over K ranks;
rank 0 merges the shards into the files above, removes them, and evaluates.
"""

from __future__ import annotations

import logging
import shutil
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from lineareval import distributed, shards
from lineareval.cache import CachePolicy
from lineareval.config import call_target, resolve_device, resolve_dtype
from lineareval.keep import check_budget, parse_keep
from lineareval.loggers import NoLogger
from lineareval.memory import PeakMemory, keep_freed_heap
from lineareval.record import (METRICS_FILE, RunRecord, environment_info, is_finished, load_record, save_record,
                               write_csv_atomic, write_json_atomic, write_npz_atomic, write_npz_stacked_atomic)

log = logging.getLogger(__name__)

IGNORED_ON_RESUME = ("force", "grid_images", "stage", "compile_backend")
STAGES = ("generate", "evaluate", "all")


class RunConflictError(RuntimeError):
    """run_dir holds a finished run made with a different configuration."""


def build_policy(cache_cfg: DictConfig) -> CachePolicy:
    """Instantiate `conf/cache/<name>.yaml`; `name` labels the record and is not a policy field."""
    return call_target(cache_cfg, exclude=("name",))


def build_generator(cfg: DictConfig, device: torch.device, dtype: torch.dtype):
    """The model adapter of `conf/model/<name>.yaml`, with the run's sampling and weights choices."""
    if device.type == "cpu":
        keep_freed_heap()  # decode steps' large temporaries reuse heap pages instead of faulting fresh ones
    return call_target(cfg.model, sampling=OmegaConf.to_container(cfg.sampling, resolve=True), weights=cfg.weights,
                       weights_dir=cfg.weights_dir, download=cfg.download, device=device, dtype=dtype, seed=cfg.seed,
                       compile=cfg.compile, compile_backend=cfg.compile_backend)


def _changed_keys(stored: dict, resolved: dict) -> list[str]:
    return sorted(key for key in set(stored) | set(resolved)
                  if key not in IGNORED_ON_RESUME and stored.get(key) != resolved.get(key))


def _existing_result(run_dir: Path, resolved: dict) -> dict | None:
    """The finished record if run_dir holds one made with this config; raise if made with another."""
    if not is_finished(run_dir):
        return None
    stored = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    changed = _changed_keys(stored, resolved)
    if changed:
        raise RunConflictError(f"{run_dir} already holds a finished run with a different configuration (differs in: "
                               f"{', '.join(changed)}); pass force=true to overwrite or run_dir=... to keep both")
    return load_record(run_dir)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generation(generator, policy: CachePolicy, budget: int, conditions, sample_ids: torch.Tensor,
                     seed: int, device: torch.device) -> tuple[torch.Tensor, dict]:
    """Generate one batch (fresh caches); returns tokens (B, N) and its cost.

    `conditions` are what the generator takes: class labels (B,) or prompts. Peak memory covers the
    cache allocation and the whole generation: the CUDA allocator's peak
    (weights included), or on CPU the RSS increase over the loaded model.
    """
    with PeakMemory(device) as memory:
        _synchronize(device)
        began = time.perf_counter()
        generation = generator.generate(conditions, sample_ids, policy, budget, seed)
        _synchronize(device)
        seconds = time.perf_counter() - began
    return generation.tokens, {"generation_s": seconds, "kv_cache_capacity_bytes": generation.capacity_bytes(),
                    "prefix_len": max(cache.layout.prefix_len for cache in generation.caches),
                    "kv_cache_high_water_bytes": generation.high_water_bytes(),
                    "peak_memory_bytes": memory.peak_bytes if device.type == "cuda" else memory.peak_increase_bytes,
                    "peak_memory_method": memory.method}


def decode(generator, tokens: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """uint8 images, resized to the benchmark's resolution when it asks for one."""
    return generator.decode_images(tokens, size=resolution)


def evaluate_run(run_dir: Path, benchmark, record: dict, device: torch.device) -> dict:
    """Score a finished generation and add the metrics to its metrics.json (written atomically)."""
    metrics = benchmark.evaluate(run_dir, device)
    clash = sorted(set(metrics) & (set(record) - {"evaluated"}))
    if clash:
        raise ValueError(f"benchmark metrics {clash} would overwrite fields of the record")
    record = {**record, **metrics, "evaluated": True}
    write_json_atomic(run_dir / METRICS_FILE, record)
    log.info("%s: %s", run_dir, ", ".join(f"{key}={value}" for key, value in metrics.items()) or "no metrics")
    return record


def evaluate_external(cfg: DictConfig, benchmark, resolved: dict, run_dir: Path) -> dict:
    """stage=evaluate of images made elsewhere, which the benchmark reads itself (DPG-Bench's images_dir):
    no model is built and nothing is generated; the record holds the metrics and says where images came from."""
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(resolved), run_dir / "config.yaml")
    device = resolve_device(cfg.device)
    record = {"benchmark": cfg.benchmark.name, "model": "external", "cache": None, "keep": None, "num_samples": None,
              "seed": cfg.seed, **environment_info(device)}
    return evaluate_run(run_dir, benchmark, record, device)


def run_suite(cfg: DictConfig, benchmark, resolved: dict, run_dir: Path) -> dict:
    """Run a multi-policy benchmark in this process; its rows become the run's record and a CSV."""
    from lineareval.benchmarks.efficiency import paper_table

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    generator = build_generator(cfg, device, dtype)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(resolved), run_dir / "config.yaml")
    rows = benchmark.run_suite(cfg, generator, device)
    environment = environment_info(device)
    record = {"benchmark": cfg.benchmark.name, "model": cfg.model.name, "weights": cfg.weights,
              "weights_files": generator.weight_files, "dtype": str(dtype).removeprefix("torch."),
              "device": str(device), **environment, "rows": rows}
    table = pd.DataFrame(rows).assign(device_name=environment["device_name"], weights=cfg.weights)
    write_csv_atomic(run_dir / "efficiency.csv", table)
    write_json_atomic(run_dir / METRICS_FILE, record)  # last: marks the run finished
    log.info("%s, weights=%s, %s, %s\n%s", cfg.model.name, cfg.weights, record["dtype"], environment["device_name"],
             paper_table(rows))
    return record


def save_grid(images: np.ndarray, path: Path, count: int) -> None:
    """PNG grid of the first `count` images (uint8 [n, H, W, 3])."""
    shown = torch.from_numpy(images[:count]).permute(0, 3, 1, 2)
    grid = make_grid(shown, nrow=int(np.ceil(np.sqrt(len(shown)))), padding=2, pad_value=255)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def run(cfg: DictConfig) -> dict:
    """Generate, measure and record one run, mirrored to the configured logger (finished on failure too).

    Under torchrun (or several Slurm tasks) every rank samples its share of the shards and rank 0 merges,
    evaluates and logs; the other ranks return a summary of their share.
    """
    ranks = distributed.setup()
    logger = call_target(cfg.logger, exclude=("name",)) if ranks.is_main else NoLogger()
    failed = True
    try:
        logger.start(OmegaConf.to_container(cfg, resolve=True), Path(cfg.run_dir))
        record = _run(cfg, ranks)
        logger.log_record(record, Path(cfg.run_dir))
        failed = False
        return record
    finally:
        logger.finish(failed)
        distributed.teardown(ranks)


def _partial_run(run_dir: Path, resolved: dict, force: bool) -> None:
    """Keep the finished shards of an interrupted run with the same config; refuse those of another config."""
    folder = run_dir / shards.SHARDS_DIR
    if force:  # the old record goes first, so an interrupted forced rerun is not mistaken for finished
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        return
    if not folder.exists():
        return
    stored = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")) if (run_dir / "config.yaml").exists() else {}
    changed = _changed_keys(stored, resolved)
    if changed:
        raise RunConflictError(f"{folder} holds shards of an unfinished run with a different configuration (differs "
                               f"in: {', '.join(changed)}); pass force=true to discard them or run_dir=... to keep both")
    log.info("resuming %s from its finished shards", run_dir)


def _run(cfg: DictConfig, ranks: distributed.Ranks = distributed.Ranks()) -> dict:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_dir = Path(cfg.run_dir)
    if cfg.stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {cfg.stage!r}")
    benchmark = call_target(cfg.benchmark, exclude=("name",))
    existing = None if cfg.force else _existing_result(run_dir, resolved)
    if cfg.stage == "evaluate" and existing is None and getattr(benchmark, "scores_external_images", False):
        return evaluate_external(cfg, benchmark, resolved, run_dir) if ranks.is_main else {"rank": ranks.rank}
    if cfg.stage == "evaluate" and existing is None:
        raise FileNotFoundError(f"stage=evaluate needs a finished generation in {run_dir} (metrics.json and "
                                "samples.npz); run stage=generate or stage=all first")
    if existing is not None:
        if cfg.stage == "generate" or existing.get("evaluated", True) or not ranks.is_main:
            log.info("%s is finished; skipping (force=true reruns it)", run_dir)
            return existing
        return evaluate_run(run_dir, benchmark, existing, resolve_device(cfg.device))
    if hasattr(benchmark, "run_suite"):  # a benchmark that runs several policies itself (efficiency)
        if ranks.distributed:
            raise ValueError(f"benchmark={cfg.benchmark.name} measures one process on one device (the paper's "
                             "protocol): start it without torchrun / with one task")
        return run_suite(cfg, benchmark, resolved, run_dir)
    if cfg.stage == "all" and hasattr(benchmark, "check") and ranks.is_main:
        benchmark.check()  # e.g. the reference batch: fail before hours of sampling, not after
    for field in ("num_samples", "batch_size"):
        if not isinstance(cfg[field], int) or cfg[field] < 1:
            raise ValueError(f"{field} must be a positive integer, got {cfg[field]!r}")
    keep = parse_keep(cfg.keep)
    device = ranks.device(resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    policy = build_policy(cfg.cache)
    generator = build_generator(cfg, device, dtype)
    layout = generator.layout
    budget = keep.budget(layout.num_visual)
    check_budget(keep, budget, policy.minimum_budget(layout), layout.num_visual, policy=cfg.cache.name,
                 model=cfg.model.name)
    if ranks.is_main:
        _partial_run(run_dir, resolved, cfg.force)
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(resolved), run_dir / "config.yaml")
    ranks.barrier()  # shards of another config are gone before any rank looks for its own

    if cfg.decode_images and not getattr(generator, "can_decode", True):
        generator.decode_images(None)  # raises the adapter's message about the missing decoder files
    samples = benchmark.samples(cfg, generator)
    plan = shards.plan(len(samples), cfg.batch_size)
    folder = run_dir / shards.SHARDS_DIR
    mine = [plan[index] for index in ranks.shards(len(plan))]
    todo = [shard for shard in mine if not shards.is_complete(folder, shard, layout.num_visual, cfg.decode_images)]
    log.info("rank %d of %d: %d of its %d shards to sample", ranks.rank, ranks.world_size, len(todo), len(mine))
    resolution = getattr(benchmark, "resolution", None)
    description = f"{cfg.model.name} {cfg.cache.name} keep={keep.text}"
    if ranks.distributed:
        description += f" rank {ranks.rank}/{ranks.world_size}"
    progress = tqdm(total=sum(shard.size for shard in mine), initial=sum(shard.size for shard in mine) -
                    sum(shard.size for shard in todo), desc=description, unit="img", disable=not ranks.is_main)
    with progress:
        for shard in todo:
            ids, conditions = samples.batch(shard.start, shard.stop, device)
            tokens, cost = timed_generation(generator, policy, budget, conditions, ids, cfg.seed, device)
            images = decode(generator, tokens, resolution).cpu().numpy() if cfg.decode_images else None
            shards.save(folder, shard, tokens.cpu().numpy(), images, cost)
            progress.update(shard.size)
    ranks.barrier()
    if not ranks.is_main:
        return {"rank": ranks.rank, "shards": len(mine), "sampled_shards": len(todo)}

    tokens, costs = zip(*((tokens, cost) for tokens, _, cost in map(partial(shards.load, folder), plan)))
    write_npz_atomic(run_dir / "tokens.npz", tokens=np.concatenate(tokens), **samples.arrays)
    if cfg.decode_images:  # streamed, shard by shard
        write_npz_stacked_atomic(run_dir / "samples.npz", "arr_0",
                                 (shards.load(folder, shard)[1] for shard in plan), len(samples))
        shown = []
        for shard in plan[:-(-cfg.grid_images // cfg.batch_size)]:  # the shards holding the first grid_images
            shown.append(shards.load(folder, shard)[1])
        save_grid(np.concatenate(shown), run_dir / "samples.png", cfg.grid_images)
    total_time = sum(cost["generation_s"] for cost in costs)
    worst = {key: max(cost[key] for cost in costs)
             for key in ("kv_cache_capacity_bytes", "kv_cache_high_water_bytes", "peak_memory_bytes")}
    record = RunRecord(
        model=cfg.model.name, cache=cfg.cache.name, keep=keep.text, visual_budget=budget,
        batch_size=cfg.batch_size, num_samples=len(samples), seed=cfg.seed, weights=cfg.weights,
        weights_files=generator.weight_files, dtype=str(dtype).removeprefix("torch."), device=str(device),
        peak_memory_method=costs[0]["peak_memory_method"], **worst, latency_s_per_batch=total_time / len(costs),
        generation_time_s=total_time, images_per_s=len(samples) / total_time,
        tokens_per_s=len(samples) * layout.num_visual / total_time, **environment_info(device),
        extra={"policy": policy.describe(), "evaluated": False, "world_size": ranks.world_size})
    save_record(record, run_dir)  # generation is safe on disk before any scoring starts
    shutil.rmtree(folder)  # merged into tokens.npz / samples.npz
    if cfg.stage == "all":
        return evaluate_run(run_dir, benchmark, record.to_dict(), device)
    log.info("%s: %.2f images/s, KV cache %.1f MiB allocated, peak memory %.1f MiB (%s) -> %s",
             cfg.cache.name, record.images_per_s, record.kv_cache_capacity_bytes / 2**20,
             record.peak_memory_bytes / 2**20, record.peak_memory_method, run_dir)
    return record.to_dict()
