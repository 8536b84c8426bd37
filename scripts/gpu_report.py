"""The GPU efficiency report: one prepared command, about 8 minutes on one H100 or H200, compilation included.

    python scripts/gpu_report.py [--out results] [--runs outputs/gpu_report] [--budget-s 450] [--dry-run]
    make gpu-report

Sections, in priority order, each a `benchmark=efficiency` run in this process (composed through Hydra,
random weights, bf16, one process: the paper's protocol, warm-up excluded):

1. `xl_compiled`: LlamaGen-XL, batch 256, `compile=true` (CUDA graphs): full, LineAR 1/4, LineAR 1/6,
   window 1/6;
2. `xl_eager`: the same batch, eager: full and LineAR 1/6 (compiled must never be slower);
3. `xl_max_batch`: full and LineAR 1/6 each at the largest batch whose memory fits an 80 GB card
   (computed from the per-image memory measured in section 1, `max_batch_at_limit`, then run once
   compiled to check that it fits and to time it): the throughput the memory LineAR frees buys;
4. `janus_compiled`: Janus-Pro-1B, batch 128, compiled: full and LineAR 1/6;
5. `lumina`: Lumina-mGPT-768, batch 12: full and LineAR 1/8, compiled if the time left allows, else eager.

Then `scripts/roofline.py` counts every row's decode steps against this device's measured bf16
matrix-product FLOP/s, memory bandwidth and weight products (`floor_s`; measured / floor is reported
for every row). Writes `<out>/gpu_<device>_efficiency.csv` (every row with its bounds) and
`<out>/gpu_<device>_efficiency.md` (the table with the floor beside each row, the targets, and what
was skipped), after every section, so a run stopped early still leaves what it measured.

Time budget (`--budget-s`): a section starts only if the time left covers its declared minimum
(`Section.min_s`, what it needs on an H100/H200 with a cold compile cache), else it is listed as
skipped; a section still running when the budget ends is stopped and listed as timed out.

`--dry-run` runs the same sections through the same code on CPU with tiny models (fp32, torch.compile's
`aot_eager` backend: the same tracing without code generation, a small memory limit and batch cap),
into a temporary folder unless `--out` is given; the test suite runs it.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from roofline import Machines, roofline_rows  # noqa: E402

log = logging.getLogger("gpu_report")

CARD_GIB = 79.0  # an 80 GB card's usable memory (an H100 80GB reports 79.6 GiB)
PEAK_LIMIT_GB = 16.0  # target: LineAR 1/6 peak memory at batch 256 on LlamaGen-XL
TINY = {  # --dry-run: the same sections on tiny models, with enough lines for LineAR at keep 1/6 (1/8 on Lumina)
    "llamagen_xl": ("model=llamagen_tiny", "model.image_size=192"),
    "janus_pro_1b": ("model=janus_pro_1b", "model.text.hidden_size=64", "model.text.intermediate_size=128",
                     "model.text.num_hidden_layers=2", "model.text.num_attention_heads=4",
                     "model.text.vocab_size=300", "model.gen.num_patches=12", "model.gen.num_embeddings=64",
                     "++model.vq={embed_dim:8,num_embeddings:64,base_channels:32,channel_multiplier:[1,1],"
                     "num_res_blocks:1,latent_channels:32,num_patches:12,projection_dim:64,image_token_embed_dim:64}"),
    "lumina_mgpt_768": ("model=lumina_mgpt_768", "model.resolution=256", "model.lm.hidden_size=64",
                        "model.lm.intermediate_size=128", "model.lm.num_hidden_layers=2",
                        "model.lm.num_attention_heads=4", "model.lm.vocab_size=9000"),
}


class SectionTimeout(Exception):
    """The report's time budget ran out inside a section."""


@dataclass
class Section:
    """One efficiency run of the report. `min_s`: the least it needs on an H100/H200, cold compile cache."""

    name: str
    model: str
    batch: int
    rows: list[str]
    compile: bool
    min_s: float
    status: str = "pending"
    seconds: float = 0.0
    note: str = ""
    run_dir: Path | None = None
    table: pd.DataFrame | None = field(default=None, repr=False)


def plan() -> list[Section]:
    """Sections 1, 2, 4 and both variants of 5; section 3 is planned from section 1's measurements."""
    return [
        Section("xl_compiled", "llamagen_xl", 256, ["full", "linear@1/4", "linear@1/6", "window@1/6"], True, 150),
        Section("xl_eager", "llamagen_xl", 256, ["full", "linear@1/6"], False, 110),
        Section("janus_compiled", "janus_pro_1b", 128, ["full", "linear@1/6"], True, 80),
        Section("lumina_compiled", "lumina_mgpt_768", 12, ["full", "linear@1/8"], True, 200),
        Section("lumina_eager", "lumina_mgpt_768", 12, ["full", "linear@1/8"], False, 150),
    ]


@dataclass
class Report:
    """Where and how the report runs: the device, the budget, the dry-run substitutions."""

    out: Path
    runs: Path
    budget_s: float
    dry_run: bool
    began: float = field(default_factory=time.perf_counter)
    sections: list[Section] = field(default_factory=list)

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    @property
    def slug(self) -> str:
        if self.dry_run:
            return "dry_run_cpu"
        return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.began)

    def overrides(self, section: Section, batch: int) -> list[str]:
        """The Hydra overrides of one section's run."""
        model = list(TINY[section.model]) if self.dry_run else [f"model={section.model}"]
        common = ["benchmark=efficiency", "weights=random", "decode_images=false", f"device={self.device}",
                  f"batch_size={batch}", f"num_samples={batch}", f"compile={str(section.compile).lower()}",
                  f"benchmark.rows=[{','.join(section.rows)}]", f"benchmark.memory_limit_gib={self.card_gib}",
                  "benchmark.warmup=1", "benchmark.repeats=1", f"run_dir={self.runs / self.slug / section.name}",
                  "force=true", "logger=none"]
        if self.dry_run:
            common += ["dtype=float32", "compile_backend=aot_eager"]
        else:
            common += ["dtype=bfloat16"]
        return model + common

    @property
    def time_scale(self) -> float:
        """Sections' declared minimum times are for an H100/H200; tiny CPU models need about 1% of them."""
        return 0.01 if self.dry_run else 1.0

    @property
    def card_gib(self) -> float:
        return 0.5 if self.dry_run else CARD_GIB

    def batch(self, section: Section) -> int:
        if not self.dry_run:
            return section.batch
        return 1 if section.model == "lumina_mgpt_768" else 2


def compose(overrides: list[str]):
    from lineareval.compose import compose_config

    return compose_config(*overrides)  # options named by their Hydra choice, as run.py names them


def release_device() -> None:
    """Drop what a finished section left: compiled code, CUDA-graph pools, cached allocator blocks.
    Inductor's on-disk cache stays, so an identical graph compiles again from the cache."""
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _on_alarm(signum, frame):
    raise SectionTimeout


def run_section(report: Report, section: Section, batch: int) -> None:
    """One efficiency run within the time left; its rows in `section.table`, its fate in `section.status`."""
    from lineareval.runner import run

    left, needed = report.left(), section.min_s * report.time_scale
    if left < needed:
        section.status, section.note = "skipped", f"{max(left, 0):.0f} s left of the budget, needs at least {needed:.0f} s"
        return
    cfg = compose(report.overrides(section, batch))
    section.run_dir = Path(cfg.run_dir)
    began = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(max(1, math.floor(left)))
    try:
        run(cfg)
        section.table = pd.read_csv(section.run_dir / "efficiency.csv", dtype={"keep": str}).assign(
            section=section.name)
        section.status = "done"
    except SectionTimeout:
        section.status, section.note = "timed out", "the report's time budget ran out inside it"
    except torch.cuda.OutOfMemoryError as error:
        section.status, section.note = "out of memory", str(error).splitlines()[0]
    except Exception as error:  # one broken section must not lose the others' results
        log.exception("section %s failed", section.name)
        section.status, section.note = "failed", f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        section.seconds = time.perf_counter() - began
        release_device()
    log.info("section %s: %s in %.0f s %s", section.name, section.status, section.seconds, section.note)


def max_batch_sections(report: Report, measured: Section, cap: int) -> list[Section]:
    """Section 3: full and LineAR 1/6, each at the largest batch section 1 computed for the card."""
    if measured.table is None:
        return []
    sections = []
    for cache, keep, row_spec in (("full", "1", "full"), ("linear", "1/6", "linear@1/6")):
        row = measured.table[(measured.table.cache == cache) & (measured.table.keep == keep)]
        if row.empty:
            continue
        largest = int(row.max_batch_at_limit.iloc[0])
        batch = max(1, min(cap, largest - largest % 8 if largest >= 16 else largest))
        section = Section(f"xl_max_batch_{cache}", measured.model, batch, [row_spec], True, 60)
        section.note = f"largest batch in {report.card_gib:g} GiB from section 1: {largest}"
        sections.append(section)
    return sections


def run_max_batch(report: Report, section: Section) -> None:
    """Run at the computed batch; on running out of memory, 10% smaller, at most twice."""
    planned = section.note
    for _ in range(3):
        run_section(report, section, section.batch)
        if section.status != "out of memory":
            break
        section.batch = max(1, int(section.batch * 0.9))
    section.note = f"{planned}; ran {section.batch}" + (f"; {section.note}" if section.note != planned else "")


def roofline_table(report: Report, machines: Machines) -> pd.DataFrame:
    """Every finished section's rows with the roofline bounds of their decode steps."""
    tables = []
    for section in report.sections:
        if section.table is None:
            continue
        bounds = pd.DataFrame(roofline_rows(section.run_dir, machines))
        columns = ["cache", "keep", "bound_s", "serial_bound_s", "floor_s", "measured_decode_s", "fraction_of_bound",
                   "fraction_of_floor", "matmul_gflops", "bandwidth_gbs", "step_products_ms"]
        tables.append(section.table.merge(bounds[columns], on=["cache", "keep"], how="left"))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def row_of(table: pd.DataFrame, section: str, cache: str, keep: str) -> pd.Series | None:
    rows = table[(table.section == section) & (table.cache == cache) & (table.keep == keep)] if not table.empty else table
    return None if rows.empty else rows.iloc[0]


def targets(table: pd.DataFrame) -> list[tuple[str, str, str, str]]:
    """(target, measured, threshold, met) for the GPU efficiency issue's targets, where measured."""
    found = []
    full, linear = (row_of(table, "xl_compiled", cache, keep) for cache, keep in (("full", "1"), ("linear", "1/6")))
    if full is not None and linear is not None:
        speedup = full.generation_s / linear.generation_s
        found.append(("LineAR 1/6 vs compiled full, XL batch 256", f"{speedup:.2f}x", ">= 1.8x", speedup >= 1.8))
        for name, row in (("full", full), ("LineAR 1/6", linear)):
            ratio = row.measured_decode_s / row.floor_s
            found.append((f"{name} compiled: measured / floor", f"{ratio:.2f}", "<= 2", ratio <= 2))
        peak = linear.peak_memory_bytes / 1e9
        found.append(("LineAR 1/6 peak memory, XL batch 256", f"{peak:.2f} GB", f"<= {PEAK_LIMIT_GB:g} GB",
                      peak <= PEAK_LIMIT_GB))
    big_full = row_of(table, "xl_max_batch_full", "full", "1")
    big_linear = row_of(table, "xl_max_batch_linear", "linear", "1/6")
    if big_full is not None and big_linear is not None:
        ratio = big_linear.images_per_s / big_full.images_per_s
        found.append((f"max-batch throughput: LineAR 1/6 (batch {big_linear.batch_size}) / full (batch "
                      f"{big_full.batch_size})", f"{ratio:.2f}x", ">= 3x", ratio >= 3))
    for cache, keep in (("full", "1"), ("linear", "1/6")):
        compiled, eager = row_of(table, "xl_compiled", cache, keep), row_of(table, "xl_eager", cache, keep)
        if compiled is not None and eager is not None:
            ratio = eager.generation_s / compiled.generation_s
            found.append((f"{cache} {keep}: eager / compiled time", f"{ratio:.2f}", ">= 1 (never slower)", ratio >= 1))
    return [(name, value, threshold, "yes" if met else "**no**") for name, value, threshold, met in found]


def markdown(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub table (pandas' to_markdown needs the optional tabulate)."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(map(str, values)) + " |" for values in frame.itertuples(index=False)]
    return "\n".join(lines)


def summary(report: Report, table: pd.DataFrame) -> str:
    """The markdown summary: the environment, every row beside its floor, the targets, each section's fate."""
    from lineareval.record import environment_info

    environment = environment_info(torch.device(report.device))
    lines = [f"# GPU efficiency report ({environment['device_name']}{', DRY RUN on tiny models' if report.dry_run else ''})",
             "", f"`scripts/gpu_report.py`, commit {environment['git_commit'][:10]}"
             f"{' (dirty)' if environment['git_dirty'] else ''}, torch {environment['versions']['torch']}, "
             f"{time.perf_counter() - report.began:.0f} s of a {report.budget_s:.0f} s budget. Random weights, "
             f"{'fp32' if report.dry_run else 'bf16'}, one process, warm-up excluded; `floor` = the device's measured "
             "weight products + the KV-cache and logits traffic at its measured bandwidth (scripts/roofline.py), "
             "over the decode steps.", ""]
    if not table.empty:
        shown = table.assign(
            peak_gb=table.peak_memory_bytes / 1e9, decode_over_floor=table.measured_decode_s / table.floor_s)
        shown = shown[["section", "model", "cache", "keep", "batch_size", "compile", "generation_s", "images_per_s",
                       "peak_gb", "speedup", "measured_decode_s", "floor_s", "decode_over_floor"]]
        lines += [markdown(shown.round(3)), ""]
    found = targets(table) if not table.empty else []
    if found:
        lines += ["## Targets", "", markdown(pd.DataFrame(found, columns=["target", "measured", "threshold", "met"])), ""]
    lines += ["## Sections", "", markdown(pd.DataFrame(
        [(s.name, s.model, s.batch, s.compile, s.status, f"{s.seconds:.0f}", s.note) for s in report.sections],
        columns=["section", "model", "batch", "compile", "status", "seconds", "note"])), ""]
    return "\n".join(lines)


def write(report: Report, table: pd.DataFrame) -> None:
    from lineareval.record import write_csv_atomic

    report.out.mkdir(parents=True, exist_ok=True)
    if not table.empty:
        write_csv_atomic(report.out / f"gpu_{report.slug}_efficiency.csv", table)
    text = summary(report, table)
    (report.out / f"gpu_{report.slug}_efficiency.md").write_text(text)
    print(text, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="results folder (default results/; a temporary one with --dry-run)")
    parser.add_argument("--runs", type=Path, help="run folders (default outputs/gpu_report)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget for all sections")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on CPU: the same code path, quickly")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: the GPU report needs one (--dry-run runs it on CPU with tiny models)")
    scratch = Path(tempfile.mkdtemp(prefix="gpu_report_")) if args.dry_run else None
    report = Report(out=args.out or scratch or ROOT / "results", runs=args.runs or scratch or ROOT / "outputs" /
                    "gpu_report", budget_s=args.budget_s, dry_run=args.dry_run)
    machines = Machines(square=256, stream_mib=32) if args.dry_run else Machines()
    planned = plan()
    xl_compiled, xl_eager, janus, lumina_compiled, lumina_eager = planned
    for section in (xl_compiled, xl_eager):
        report.sections.append(section)
        run_section(report, section, report.batch(section))
        write(report, roofline_table(report, machines))
    for section in max_batch_sections(report, xl_compiled, cap=4 if args.dry_run else 4096):
        report.sections.append(section)
        run_max_batch(report, section)
        write(report, roofline_table(report, machines))
    report.sections.append(janus)
    run_section(report, janus, report.batch(janus))
    lumina = lumina_compiled if report.left() >= lumina_compiled.min_s * report.time_scale else lumina_eager
    report.sections.append(lumina)
    run_section(report, lumina, report.batch(lumina))
    write(report, roofline_table(report, machines))


if __name__ == "__main__":
    main()
