"""The runner: conditions from the benchmark, samples from the generator under a policy, one record.

Run folder contents: `config.yaml` (resolved), `tokens.npz` (`tokens` [n, N] plus `labels` [n] or
`prompts`, `prompt_index`, `image_index`),
`samples.npz` (ADM layout: `arr_0` uint8 [n, H, W, 3]), `samples.png` (a grid of the first samples),
and `metrics.json`, written last: its presence marks the run finished.

Sampling goes batch by batch into `shards/` (lineareval/shards.py), so an interrupted run resumes with
the missing batches only, and `torchrun --nproc_per_node=K run.py ...` splits the batches over K ranks;
rank 0 merges the shards into the files above, removes them, and evaluates.

Integrity: rank 0 holds the run folder's lock (lineareval/runlock.py) for the whole run, a run folder
is reused only by a run of the same identity (lineareval/identity.py, stored in `identity.json`), every
shard carries that identity's fingerprint, a rerun removes what interrupted runs of it left, and
SIGTERM (Slurm's time limit) ends the run cleanly with its finished shards kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from lineareval import distributed, runfolder, shards, threads
from lineareval.factory import build_budgets, build_decoding, build_generator, build_policy, timed_generation
from lineareval.benchmarks.paired import PairedRequest
from lineareval.cache import CachePolicy
from lineareval.cache.allocation import Budgets
from lineareval.config import call_target, check_run_fields, resolve_device, resolve_dtype
from lineareval.identity import config_identity, content_identity, run_fingerprint
from lineareval.keep import parse_keep
from lineareval.loggers import NoLogger
from lineareval.record import (METRICS_FILE, BudgetAllocation, Decoding, RunRecord, StorageError, environment_info,
                               save_record, write_csv_atomic, write_json_atomic, write_npz_atomic,
                               write_npz_stacked_atomic)
from lineareval.runfolder import RunConflictError, RunInterrupted
from lineareval.runlock import RunLockedError
from lineareval.validation import check_components, check_conditions

log = logging.getLogger(__name__)
# A decoding method's per-image statistics in a shard's cost, averaged over images into the record (those every
# shard has: draft_acceptance and tokens_fed_per_pass are the speculative methods' alone)
DECODING_STATS = ("decode_passes_per_image", "tokens_per_pass", "draft_acceptance", "tokens_fed_per_pass")

__all__ = ["RunConflictError", "RunInterrupted", "RunLockedError", "StorageError", "run"]


def decode(generator, tokens: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """uint8 images, resized to the benchmark's resolution when it asks for one."""
    return generator.decode_images(tokens, size=resolution)


def evaluate_run(run_dir: Path, benchmark, record: dict, device: torch.device,
                 paired: PairedRequest | None = None) -> dict:
    """Score a finished generation and add the metrics to its metrics.json (written atomically).

    An image benchmark also adds KID and the paired metrics against the full-cache partner (`paired`).
    A record evaluated before is scored again from its generation fields: the metrics of the earlier
    evaluation (`evaluated_fields`) are replaced, never the generation's own fields.
    """
    metrics = benchmark.evaluate(run_dir, device)
    if paired is not None and benchmark.pairs_images:
        metrics.update(benchmark.evaluate_paired(run_dir, paired, device))
    earlier = set(record.get("evaluated_fields", ()))
    if record.get("evaluated") and "evaluated_fields" not in record:  # evaluated before the list was kept
        earlier = set(metrics) - {field.name for field in dataclasses.fields(RunRecord)}
    record = {key: value for key, value in record.items() if key not in earlier}
    clash = sorted(set(metrics) & (set(record) - {"evaluated", "evaluated_fields"}))
    if clash:
        raise ValueError(f"benchmark metrics {clash} would overwrite fields of the record")
    record = {**record, **metrics, "evaluated": True, "evaluated_fields": sorted(metrics)}
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
              "seed": cfg.seed, **environment_info(device), **threads.cpu_info()}
    return evaluate_run(run_dir, benchmark, record, device)


def run_suite(cfg: DictConfig, benchmark, resolved: dict, run_dir: Path, identity: dict) -> dict:
    """Run a multi-policy benchmark in this process; its rows become the run's record and a CSV."""
    from lineareval.benchmarks.efficiency import paper_table

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    generator = build_generator(cfg, device, dtype)
    check_conditions(cfg, generator)
    runfolder.prepare(run_dir, resolved, {**identity, "fingerprint": run_fingerprint(cfg, {})}, cfg.force)
    rows = benchmark.run_suite(cfg, generator, device)
    environment = environment_info(device)
    record = {"benchmark": cfg.benchmark.name, "model": cfg.model.name, "weights": cfg.weights,
              "weights_files": generator.weight_files, "dtype": str(dtype).removeprefix("torch."),
              "device": str(device), **environment, **threads.cpu_info(), "rows": rows}
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
    evaluates and logs; the other ranks return a summary of their share. SIGTERM raises RunInterrupted
    after logging how to resume.
    """
    ranks = distributed.setup()
    threads.configure()  # this process's share of the usable cores
    logger = call_target(cfg.logger, exclude=("name",)) if ranks.is_main else NoLogger()
    # resolved once: the default run_dir hashes the config, which code may later change (efficiency sets a prompt)
    cfg.run_dir = str(cfg.run_dir)
    run_dir = Path(cfg.run_dir)
    failed = True
    try:
        with runfolder.sigterm_raises():
            logger.start(OmegaConf.to_container(cfg, resolve=True), run_dir)
            record = _run(cfg, ranks)
            logger.log_record(record, run_dir)
            failed = False
            return record
    except (RunInterrupted, KeyboardInterrupt) as interrupt:
        log.warning(runfolder.interrupted_message(run_dir, str(interrupt) or "Ctrl-C"))
        raise
    finally:
        logger.finish(failed)
        distributed.teardown(ranks)


def _run(cfg: DictConfig, ranks: distributed.Ranks = distributed.Ranks()) -> dict:
    """Check the fields, lock the run folder (rank 0, for every rank), then skip, evaluate or generate."""
    check_run_fields(cfg)  # before the folder is touched or a model loaded
    check_components(cfg, lambda: build_decoding(cfg.decoding), lambda: build_policy(cfg.cache))
    run_dir = Path(cfg.run_dir)
    benchmark = call_target(cfg.benchmark, exclude=("name",))
    if benchmark.suite and ranks.distributed:
        raise ValueError(f"benchmark={cfg.benchmark.name} measures one process on one device (the paper's "
                         "protocol): start it without torchrun / with one task")
    identity = {"config": config_identity(cfg)}
    paired = PairedRequest.from_config(cfg)  # a bad paired.* stops here, before anything is generated
    lock = ranks.on_main(partial(runfolder.lock, run_dir, cfg.force))
    try:
        # a finished run is used wherever it was made if device and dtype were left to the machine (not for
        # a suite: it measures the device)
        suite = benchmark.suite
        unpinned = () if suite else tuple(field for field in ("device", "dtype") if cfg[field] == "auto")
        existing = None if cfg.force else runfolder.existing_result(run_dir, identity, unpinned)
        existing = runfolder.usable_result(run_dir, existing, cfg.decode_images, writable=lock is not None)
        if lock is not None:  # rank 0 holding the folder (not a read-only one)
            runfolder.remove_leftovers(run_dir, finished=existing is not None)
        if cfg.stage == "evaluate" and existing is None and benchmark.scores_external_images:
            resolved = OmegaConf.to_container(cfg, resolve=True)
            return evaluate_external(cfg, benchmark, resolved, run_dir) if ranks.is_main else {"rank": ranks.rank}
        if cfg.stage == "evaluate" and existing is None:
            raise FileNotFoundError(f"stage=evaluate needs a finished generation in {run_dir} (metrics.json and "
                                    "samples.npz); run stage=generate or stage=all first")
        if existing is not None:
            rescore = cfg.stage == "evaluate" and "evaluated" in existing  # a generation record, scored again
            if cfg.stage == "generate" or not ranks.is_main or (existing.get("evaluated", True) and not rescore):
                log.info("%s is finished; skipping (force=true reruns it, stage=evaluate scores it again)", run_dir)
                return existing
            return evaluate_run(run_dir, benchmark, existing, resolve_device(cfg.device), paired)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        if suite:  # a benchmark that runs several policies itself (efficiency)
            return run_suite(cfg, benchmark, resolved, run_dir, identity)
        return _generate(cfg, ranks, benchmark, resolved, identity, paired)
    finally:
        if lock is not None:
            lock.release()


def _generate(cfg: DictConfig, ranks: distributed.Ranks, benchmark, resolved: dict, identity: dict,
              paired: PairedRequest | None = None) -> dict:
    """Sample this rank's missing shards under the run's identity; rank 0 then merges, records, evaluates."""
    run_dir = Path(cfg.run_dir)
    if cfg.stage == "all":
        ranks.on_main(benchmark.check)  # e.g. the reference batch: fail before hours of sampling, not after
    keep = parse_keep(cfg.keep)
    device = ranks.device(resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    policy = build_policy(cfg.cache)
    method = build_decoding(cfg.decoding)
    generator = build_generator(cfg, device, dtype)
    check_conditions(cfg, generator)
    layout = generator.layout
    budgets = build_budgets(cfg, policy, generator)  # B from keep, spread by budget_allocation
    if cfg.decode_images and not generator.can_decode:
        generator.decode_images(None)  # raises the adapter's message about the missing decoder files
    samples = benchmark.samples(cfg, generator)
    resolution = benchmark.resolution
    identity = {**identity, "content": content_identity(generator.weight_files, samples.arrays, len(samples),
                                                        resolution)}
    fingerprint = run_fingerprint(cfg, identity["content"])
    # shards of another identity are refused before any rank looks for its own
    ranks.on_main(partial(runfolder.prepare, run_dir, resolved, {**identity, "fingerprint": fingerprint}, cfg.force))

    description = f"{cfg.model.name} {cfg.cache.name} keep={keep.text} {budgets.name}"
    todo, sampled = _sample_shards(cfg, ranks, generator, policy, budgets, method, samples, fingerprint, resolution,
                                   device, description)
    ranks.barrier()
    if not ranks.is_main:
        return {"rank": ranks.rank, "shards": todo, "sampled_shards": sampled}
    folder = run_dir / shards.SHARDS_DIR
    cost = _merge(cfg, run_dir, samples, fingerprint)
    record = RunRecord(
        model=cfg.model.name, cache=cfg.cache.name, keep=keep.text, visual_budget=budgets.visual_budget,
        batch_size=cfg.batch_size, num_samples=len(samples), seed=cfg.seed, weights=cfg.weights,
        weights_files=generator.weight_files, dtype=str(dtype).removeprefix("torch."), device=str(device),
        tokens_per_s=len(samples) * layout.num_visual / cost["generation_time_s"],
        **{key: value for key, value in cost.items() if key not in ("decoding_stats", "decoding_method")},
        **environment_info(device),
        decoding=Decoding.parse(cost["decoding_method"]),  # what ran, as every shard reported it
        budget_allocation=BudgetAllocation.parse(budgets.describe()),
        extra={"policy": policy.describe(), "distribution_preserving": method.distribution_preserving,
               **cost["decoding_stats"], "evaluated": False, "world_size": ranks.world_size,
               "run_fingerprint": fingerprint, **threads.cpu_info()})
    save_record(record, run_dir)  # generation is safe on disk before any scoring starts
    shutil.rmtree(folder)  # merged into tokens.npz / samples.npz (a kill before this: the next run removes it)
    if cfg.stage == "all":
        return evaluate_run(run_dir, benchmark, record.to_dict(), device, paired)
    log.info("%s: %.2f images/s, KV cache %.1f MiB allocated, peak memory %.1f MiB (%s) -> %s",
             cfg.cache.name, record.images_per_s, record.kv_cache_capacity_bytes / 2**20,
             record.peak_memory_bytes / 2**20, record.peak_memory_method, run_dir)
    return record.to_dict()


def _sample_shards(cfg: DictConfig, ranks: distributed.Ranks, generator, policy: CachePolicy, budget: Budgets,
                   method, samples, fingerprint: str, resolution: int | None, device: torch.device,
                   description: str) -> tuple[int, int]:
    """Sample this rank's share of the samples no finished shard holds (of any batch size: sample i depends
    only on (seed, i)); returns (the run's shards to sample, this rank's)."""
    folder = Path(cfg.run_dir) / shards.SHARDS_DIR
    # rank 0 checks every finished shard and removes the unusable; then every rank lists the same ones
    ranks.on_main(partial(shards.finished, folder, len(samples), generator.layout.num_visual, cfg.decode_images,
                          fingerprint))
    pieces, gaps = shards.cover(shards.listed(folder, len(samples)), len(samples))
    ranks.barrier()  # all have listed before any writes a new shard
    todo = shards.missing(gaps, cfg.batch_size)
    mine = [todo[index] for index in ranks.shards(len(todo))]
    reused = sum(piece.stop - piece.start for piece in pieces)
    log.info("rank %d of %d: %d of the run's %d shards to sample (%d of %d samples finished)", ranks.rank,
             ranks.world_size, len(mine), len(todo), reused, len(samples))
    if ranks.distributed:
        description += f" rank {ranks.rank}/{ranks.world_size}"
    progress = tqdm(total=len(samples), initial=len(samples) - sum(shard.size for shard in todo), desc=description,
                    unit="img", disable=not ranks.is_main)
    with progress:
        for shard in mine:
            ids, conditions = samples.batch(shard.start, shard.stop, device)
            tokens, cost = timed_generation(generator, policy, budget, conditions, ids, cfg.seed, device, method)
            images = decode(generator, tokens, resolution).cpu().numpy() if cfg.decode_images else None
            shards.save(folder, shard, tokens.cpu().numpy(), images, cost, fingerprint)
            progress.update(shard.size)
    return len(todo), len(mine)


def _merge(cfg: DictConfig, run_dir: Path, samples, fingerprint: str) -> dict:
    """Merge the shards into tokens.npz / samples.npz / samples.png; returns the cost fields of the record."""
    folder = run_dir / shards.SHARDS_DIR
    pieces, gaps = shards.cover(shards.listed(folder, len(samples)), len(samples))
    if gaps:
        raise RuntimeError(f"{folder} lacks samples {', '.join(f'{gap.start}..{gap.stop - 1}' for gap in gaps)} after "
                           "sampling (a shard removed while this run held the folder); run the command again")

    def load(piece: shards.Piece) -> tuple[np.ndarray, np.ndarray | None, dict]:
        tokens, images, cost = shards.load(folder, piece.shard, fingerprint=fingerprint)
        return tokens[piece.rows], None if images is None else images[piece.rows], cost

    tokens, costs = zip(*((tokens, cost) for tokens, _, cost in map(load, pieces)))
    write_npz_atomic(run_dir / "tokens.npz", tokens=np.concatenate(tokens), **samples.arrays,
                     fingerprint=np.array(fingerprint))  # checked against the record before a skip
    if cfg.decode_images:  # streamed, shard by shard
        write_npz_stacked_atomic(run_dir / "samples.npz", "arr_0", (load(piece)[1] for piece in pieces), len(samples))
    if cfg.decode_images and cfg.grid_images > 0:
        shown = [piece for index, piece in enumerate(pieces) if index == 0 or pieces[index - 1].stop < cfg.grid_images]
        save_grid(np.concatenate([load(piece)[1] for piece in shown]), run_dir / "samples.png", cfg.grid_images)
    # a piece of a larger shard (resumed at another batch size) costs its share of that shard's time
    shares = [(piece.stop - piece.start) / piece.shard.size for piece in pieces]
    costs = [{**cost, "generation_s": cost["generation_s"] * share} for cost, share in zip(costs, shares)]
    ran = {json.dumps(cost.get("decoding_method"), sort_keys=True) for cost in costs}
    if len(ran) != 1 or "null" in ran:
        raise RunConflictError(f"the shards in {folder} were decoded by {sorted(ran)} (null: a shard older than the "
                               "record of what ran): rerun with force=true")
    total_time = sum(cost["generation_s"] for cost in costs)
    worst = {key: max(cost[key] for cost in costs)
             for key in ("kv_cache_capacity_bytes", "kv_cache_high_water_bytes", "peak_memory_bytes")}
    sizes = [piece.stop - piece.start for piece in pieces]
    batches = len(shards.plan(len(samples), cfg.batch_size))  # the run's batches (resumed pieces: their share)
    decoding = {key: sum(cost[key] * size for cost, size in zip(costs, sizes)) / len(samples)
                for key in DECODING_STATS if all(key in cost for cost in costs)}  # means over images
    return {"peak_memory_method": costs[0]["peak_memory_method"], "decoding_method": costs[0]["decoding_method"],
            **worst, "latency_s_per_batch": total_time / batches,
            "generation_time_s": total_time, "images_per_s": len(samples) / total_time, "decoding_stats": decoding}
