"""notebooks/tables.ipynb and figures.ipynb: stripped, paired with their .py, and executed on fixture results.

The fixture writes results in the formats `scripts/collect.py` writes (efficiency.csv, quality.csv and
step_latency.csv with `source` = ours, plus the paper's rows from results/paper/) and a few run folders as
the runner writes them. Its numbers are synthetic. `python tests/test_notebooks.py OUT.png` renders the
fixture's memory/latency-against-keep figure, labelled as fixture data, to OUT.png.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import jupytext
import nbformat
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb
from nbclient import NotebookClient
from PIL import Image

from lineareval.api import policy_colors
from record_files import samples_record, write_record

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PAPER = ROOT / "results" / "paper"
NAMES = ("tables", "figures")
DEVICE = "Fixture GPU"
N = 576  # LlamaGen-XL: 24 x 24 visual tokens
KV_BYTES_PER_TOKEN = 36 * 2 * 1280 * 2  # layers x (k, v) x dim x bf16, one sequence
SAMPLE_COLORS = {("full", "1", 0): (255, 0, 0), ("linear", "1/4", 0): (0, 255, 0),
                 ("window", "1/4", 0): (0, 0, 255), ("linear", "1/4", 1): (255, 255, 0)}
GRID_IMAGES = 4
LINEAR = {"anchors": "line", "recent_lines": 1, "score_source": "line"}
QUALITY = [  # benchmark, model, cache, keep, run, {metric: value}, samples[, policy settings]
    ("imagenet_fid", "llamagen_xl", "full", "1", 0, {"fid": 2.8012, "precision": 0.8213, "recall": 0.5801}, 50000),
    ("imagenet_fid", "llamagen_xl", "linear", "1/4", 0, {"fid": 2.7433}, 50000),
    ("imagenet_fid", "llamagen_xl", "linear", "1/6", 0, {"fid": 2.7000}, 50000),
    ("imagenet_fid", "llamagen_xl", "linear", "1/6", 1, {"fid": 2.7200}, 50000),  # a second seed: averaged
    ("imagenet_fid", "llamagen_xl", "linear", "1/6", 2, {"fid": 3.1400}, 50000, {**LINEAR, "anchors": 0}),  # ablation
    ("imagenet_fid", "llamagen_xl", "window", "1/6", 0, {"fid": 4.9031}, 50000),
    ("coco_fid", "janus_pro_1b", "full", "1", 0, {"fid": 24.1123, "clip_score": 31.2104}, 30000),
    ("coco_fid", "janus_pro_1b", "linear", "1/6", 0, {"fid": 23.0456, "clip_score": 31.0407}, 30000),
    ("dpg", "lumina_mgpt_768", "full", "1", 0, {"dpg_score": 0.7912}, 4260),
    ("dpg", "lumina_mgpt_768", "linear", "1/8", 0, {"dpg_score": 0.8034}, 4260),
]


PAIRED = [  # demo_fid runs against their full-cache partner: cache, keep, {metric: (value, ci_low, ci_high)}
    ("linear", "1/4", {"token_agreement": (0.61, 0.58, 0.64), "psnr": (19.2, 18.7, 19.8), "ssim": (0.63, 0.6, 0.66),
                       "inception_cosine": (0.84, 0.82, 0.86), "fid_difference": (1.5, -2.0, 5.0)}),
    ("linear", "1/8", {"token_agreement": (0.45, 0.42, 0.48), "psnr": (16.1, 15.6, 16.6), "ssim": (0.5, 0.47, 0.53),
                       "inception_cosine": (0.77, 0.75, 0.79), "fid_difference": (9.25, 4.5, 14.0)}),
    ("window", "1/4", {"token_agreement": (0.4, 0.37, 0.43), "psnr": (15.0, 14.5, 15.5), "ssim": (0.4, 0.37, 0.43),
                       "inception_cosine": (0.7, 0.68, 0.72), "fid_difference": (21.0, 15.0, 27.0)}),
]


def budget(keep: str) -> int:
    numerator, _, denominator = keep.partition("/")
    return N * int(numerator) // int(denominator or 1)


def efficiency_rows() -> pd.DataFrame:
    """Rows as the efficiency benchmark writes them (and collect extends): a keep sweep at batch 256 and
    a batch sweep at keep 1/6; memory and latency follow a simple cache-size model."""
    grid = [(256, cache, keep) for cache in ("full", "window", "streamingllm", "linear")
            for keep in (["1"] if cache == "full" else ["1/4", "1/6", "1/8"])]
    grid += [(batch, cache, keep) for batch in (64, 128) for cache, keep in (("full", "1"), ("linear", "1/6"),
                                                                             ("window", "1/6"))]
    rows = []
    for batch, cache, keep in grid:
        visual_budget, slack = budget(keep), {"full": 0, "linear": 24}.get(cache, 1)
        capacity = 2 * batch * (visual_budget + slack + 1) * KV_BYTES_PER_TOKEN
        seconds = N * (0.01 + 1e-7 * 2 * batch * (N / 2 if cache == "full" else visual_budget))
        seconds *= {"linear": 1.06, "streamingllm": 1.03}.get(cache, 1.0)  # scoring and bookkeeping overheads
        rows.append({"model": "llamagen_xl", "cache": cache, "keep": keep, "visual_budget": visual_budget,
                     "batch_size": batch, "sequences": 2 * batch, "generation_s": seconds,
                     "kv_cache_capacity_bytes": capacity, "kv_cache_high_water_bytes": capacity,
                     "peak_memory_bytes": 3_100_000_000 + capacity, "peak_memory_method": "cuda_max_memory_allocated",
                     "images_per_s": batch / seconds, "tokens_per_s": batch * N / seconds,
                     "run_dir": f"outputs/efficiency/llamagen_xl/batch-{batch}"})
    table = pd.DataFrame(rows)
    full = table[table.cache == "full"].set_index("batch_size")
    return table.assign(speedup=table.batch_size.map(full.generation_s) / table.generation_s,
                        memory_saving=1 - table.peak_memory_bytes / table.batch_size.map(full.peak_memory_bytes),
                        kv_saving=1 - table.kv_cache_capacity_bytes / table.batch_size.map(full.kv_cache_capacity_bytes),
                        peak_memory_gb=table.peak_memory_bytes / 1e9, source="ours", device_name=DEVICE,
                        weights="random")


def quality_rows() -> pd.DataFrame:
    rows = []
    for benchmark, model, cache, keep, run, metrics, samples, *policy in QUALITY:
        settings = policy[0] if policy else LINEAR if cache == "linear" else {}
        rows += [{"benchmark": benchmark, "model": model, "cache": cache, "keep": keep,
                  "policy": json.dumps(settings, sort_keys=True), "metric": metric, "value": value,
                  "num_samples": samples, "source": "ours", "device_name": DEVICE, "weights": "checkpoint",
                  "run_dir": f"outputs/{benchmark}/{model}/{cache}/{keep}/{run}"} for metric, value in metrics.items()]
    for cache, keep, metrics in PAIRED:
        rows += [{"benchmark": "demo_fid", "model": "demo", "cache": cache, "keep": keep, "policy": "{}", "seed": 0,
                  "metric": metric, "value": value, "ci_low": low, "ci_high": high, "confidence": 0.95,
                  "num_samples": 400, "source": "ours", "device_name": DEVICE, "weights": "checkpoint",
                  "run_dir": f"outputs/demo_fid/demo/{cache}/{keep}"} for metric, (value, low, high) in metrics.items()]
    rows.append({"benchmark": "demo_fid", "model": "demo", "cache": "full", "keep": "1", "policy": "{}", "seed": 0,
                 "metric": "kid", "value": 0.0123, "se": 0.0021, "num_samples": 400, "source": "ours",
                 "device_name": DEVICE, "weights": "checkpoint", "run_dir": "outputs/demo_fid/demo/full/1"})
    return pd.DataFrame(rows)


def step_latency_rows() -> pd.DataFrame:
    """Full cache: cost grows with the context; budgets level off (LineAR: a scoring bump at line ends)."""
    rows = []
    for cache, keep in (("full", "1"), ("linear", "1/6"), ("window", "1/6")):
        for step in range(N):
            context = step if cache == "full" else min(step, budget(keep) + (24 if cache == "linear" else 1))
            line_end = cache == "linear" and step >= budget(keep) and (step + 1) % 24 == 0
            rows.append({"model": "llamagen_xl", "cache": cache, "keep": keep, "batch_size": 256, "step": step,
                         "seconds": 0.010 + 2e-5 * context + 0.002 * line_end})
    return pd.DataFrame(rows).assign(source="ours", device_name=DEVICE, weights="random",
                                     run_dir="outputs/efficiency/llamagen_xl/batch-256")


def write_run_folder(outputs: Path, cache: str, keep: str, seed: int, color: tuple[int, int, int]) -> None:
    """A finished `samples` run of llamagen_tiny: config.yaml, metrics.json, tokens.npz, samples.npz."""
    run_dir = outputs / "samples" / "llamagen_tiny" / cache / f"keep-{keep.replace('/', '_')}" / "random" / f"seed-{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"model:\n  name: llamagen_tiny\ncache:\n  name: {cache}\nbenchmark:\n"
                                         f"  name: samples\nkeep: '{keep}'\nseed: {seed}\nweights: random\n")
    write_record(run_dir, samples_record(model="llamagen_tiny", cache=cache, keep=keep, visual_budget=budget(keep),
                                         seed=seed, weights="random", num_samples=8))
    np.savez(run_dir / "tokens.npz", tokens=np.zeros((8, 256), np.int64), labels=(np.arange(8) * 7 + seed) % 10)
    np.savez(run_dir / "samples.npz", arr_0=np.broadcast_to(np.array(color, np.uint8), (8, 32, 32, 3)).copy())


def build_results(root: Path, runs: bool) -> dict[str, Path]:
    """results/ (with the paper's tables) and outputs/ under `root`; with `runs`, ours as collect writes them."""
    results, outputs = root / "results", root / "outputs"
    shutil.copytree(PAPER, results / "paper")
    outputs.mkdir()
    if runs:
        for name, ours in (("efficiency", efficiency_rows()), ("quality", quality_rows())):
            paper = pd.read_csv(PAPER / f"{name}.csv", dtype={"keep": str})
            pd.concat([ours, paper]).to_csv(results / f"{name}.csv", index=False)
        step_latency_rows().to_csv(results / "step_latency.csv", index=False)
        pd.DataFrame([{"benchmark": "imagenet_fid", "model": "llamagen_xl", "cache": "linear", "keep": "1/6",
                       "policy": json.dumps(LINEAR, sort_keys=True), "num_samples": 50000, "weights": "checkpoint",
                       "metric": "fid", "mean": 2.71, "std": 0.0141, "min": 2.70, "max": 2.72, "seeds": 2}]
                     ).to_csv(results / "quality_seeds.csv", index=False)
        for (cache, keep, seed), color in SAMPLE_COLORS.items():
            write_run_folder(outputs, cache, keep, seed, color)
    return {"LINEAREVAL_RESULTS": results, "LINEAREVAL_OUTPUTS": outputs, "LINEAREVAL_FIGURES": root / "figures"}


def execute(name: str, paths: dict[str, Path], **extra_env: str) -> nbformat.NotebookNode:
    """Run the committed notebook in a fresh kernel with the fixture's folders; raises on any cell error."""
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    env = {**os.environ, **{key: str(value) for key, value in paths.items()},
           "LINEAREVAL_GRID_IMAGES": str(GRID_IMAGES), **extra_env}
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute(env=env)
    warnings = [output.text for cell in notebook.cells for output in cell.get("outputs", [])
                if output.get("name") == "stderr"]
    assert not warnings, f"{name}.ipynb wrote to stderr: {warnings}"
    return notebook


def cell_text(notebook: nbformat.NotebookNode, tag: str) -> str:
    """Printed and displayed (text/plain) output of the cell tagged `tag`."""
    cell = next(cell for cell in notebook.cells if tag in cell.metadata.get("tags", []))
    return "".join(output.get("text", "") or output.get("data", {}).get("text/plain", "") for output in cell.outputs)


def table_lines(text: str, *tokens: str) -> list[list[str]]:
    """Rows (lines led by their index) of a printed DataFrame that contain every one of `tokens`, split."""
    return [line.split() for line in text.splitlines()
            if line.split()[:1] != [] and line.split()[0].isdigit() and set(tokens) <= set(line.split())]


def has_numbers(line: list[str], *numbers: float, tolerance: float = 6e-3) -> bool:
    values = [float(token.rstrip("%x")) for token in line if token.rstrip("%x").replace(".", "", 1).isdigit()]
    return all(any(math.isclose(value, number, abs_tol=tolerance) for value in values) for number in numbers)


def pixels_near(path: Path, rgb: tuple[int, int, int], tolerance: int = 40) -> np.ndarray:
    """(row, column) of the pixels within `tolerance` of `rgb`."""
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return np.argwhere(np.abs(image - np.array(rgb)).max(axis=-1) <= tolerance)


def assert_real_png(path: Path) -> None:
    image = np.asarray(Image.open(path).convert("RGB")).astype(np.int32)
    assert image.shape[0] > 200 and image.shape[1] > 300, f"{path.name} is only {image.shape}"
    colors = np.unique(image[..., 0] << 16 | image[..., 1] << 8 | image[..., 2])
    assert len(colors) > 50, f"{path.name} has almost no content"


@pytest.fixture(scope="module")
def with_runs(tmp_path_factory) -> dict:
    paths = build_results(tmp_path_factory.mktemp("with_runs"), runs=True)
    return {"paths": paths, **{name: execute(name, paths) for name in NAMES}}


@pytest.fixture(scope="module")
def paper_only(tmp_path_factory) -> dict:
    paths = build_results(tmp_path_factory.mktemp("paper_only"), runs=False)
    return {"paths": paths, **{name: execute(name, paths) for name in NAMES}}


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_stripped_and_matches_its_script(name):
    committed = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(committed)
    paired = jupytext.read(NOTEBOOKS / f"{name}.py")
    assert [(cell.cell_type, cell.source, cell.metadata.get("tags")) for cell in committed.cells] == \
        [(cell.cell_type, cell.source, cell.metadata.get("tags")) for cell in paired.cells], \
        f"notebooks/{name}.ipynb differs from {name}.py: run `jupytext --sync notebooks/{name}.py`"
    code = [cell for cell in committed.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code), \
        f"notebooks/{name}.ipynb has outputs: strip them (e.g. `jupytext --to ipynb notebooks/{name}.py`)"
    assert committed.metadata.jupytext.formats == "ipynb,py:percent"


def test_efficiency_table_puts_ours_beside_the_papers(with_runs):
    text = cell_text(with_runs["tables"], "efficiency")
    rows = efficiency_rows()
    lines = [" ".join(line) for line in table_lines(text, "llamagen_xl")]
    paper = next(index for index, line in enumerate(lines) if set(line.split()) >= {"linear", "1/6", "256", "paper"})
    assert has_numbers(lines[paper].split(), 96, 20.97, 67.61, 43.78, 7.57)
    ours = lines[paper + 1].split()  # right below the paper's row of the same model, method, keep and batch
    expected = rows[(rows.cache == "linear") & (rows.keep == "1/6") & (rows.batch_size == 256)].iloc[0]
    assert {"linear", "1/6", "256", "ours", "random"} <= set(ours)
    assert has_numbers(ours, expected.peak_memory_gb, 100 * expected.memory_saving, expected.generation_s,
                       expected.speedup)
    assert len(table_lines(text, "ours")) == len(rows) and len(table_lines(text, "paper")) == 17


def test_quality_tables_average_ours_and_keep_the_papers(with_runs):
    imagenet = cell_text(with_runs["tables"], "imagenet_fid")
    assert has_numbers(table_lines(imagenet, "full", "paper")[0], 2.77)
    assert has_numbers(table_lines(imagenet, "linear", "1/6", "paper")[0], 2.68)
    assert has_numbers(table_lines(imagenet, "full", "ours", "50000")[0], 2.8012, 0.8213, 0.5801, 1)
    (seeds,) = table_lines(imagenet, "linear", "1/6", "ours", "anchors=line,recent_lines=1,score_source=line")
    assert has_numbers(seeds, 2.71, 2) and not has_numbers(seeds, 2.70, 2.72, tolerance=1e-4)
    (ablation,) = table_lines(imagenet, "linear", "1/6", "ours", "anchors=0,recent_lines=1,score_source=line")
    assert has_numbers(ablation, 3.14, 1)  # another LineAR setting is a row of its own, never averaged in
    coco = cell_text(with_runs["tables"], "coco_fid")
    assert has_numbers(table_lines(coco, "linear", "1/6", "ours")[0], 23.0456, 31.0407)
    assert has_numbers(table_lines(coco, "linear", "1/6", "paper")[0], 22.86)
    dpg = cell_text(with_runs["tables"], "dpg")
    assert "no dpg rows of the paper's" in dpg and has_numbers(table_lines(dpg, "linear", "1/8", "ours")[0], 0.8034)


def test_paired_table_shows_intervals_and_marks_differences_from_full(with_runs):
    text = cell_text(with_runs["tables"], "paired")
    (linear_8,) = table_lines(text, "linear", "1/8", "demo_fid")
    assert "[4.5," in linear_8 and "14]*" in linear_8  # FID difference 9.25 [4.5, 14]: excludes 0
    (linear_4,) = table_lines(text, "linear", "1/4", "demo_fid")
    assert "[-2," in linear_4 and "5]" in linear_4 and "5]*" not in linear_4  # covers 0: not marked
    (full,) = table_lines(text, "full", "demo_fid")
    assert "+-" in full and "0.0123" in full
    seeds = cell_text(with_runs["tables"], "seeds")
    assert has_numbers(table_lines(seeds, "linear", "1/6")[0], 2.71, 0.0141, 2)


def test_tables_show_the_papers_rows_alone_before_any_run(paper_only):
    text = cell_text(paper_only["tables"], "efficiency")
    assert "no runs collected yet" in text and not table_lines(text, "ours")
    assert len(table_lines(text, "paper")) == len(pd.read_csv(PAPER / "efficiency.csv")) == 17
    assert has_numbers(table_lines(text, "lumina_mgpt_1024", "linear", "1/8", "paper")[0], 20.50, 248.63, 2.64)
    assert "no dpg rows" in cell_text(paper_only["tables"], "dpg")


def test_figures_from_fixture_results(with_runs):
    figures = with_runs["paths"]["LINEAREVAL_FIGURES"]
    grid = "samples_samples_llamagen_tiny_random_seed-0.png"  # seed 1 has one policy only: no grid
    assert sorted(path.name for path in figures.iterdir()) == sorted(
        ["memory_latency_vs_keep.png", "memory_latency_vs_batch.png", "fid_vs_keep.png", grid, "step_latency.png",
         "fidelity_vs_keep.png"])
    for path in figures.iterdir():
        assert_real_png(path)
    colors = {name: tuple(round(255 * channel) for channel in to_rgb(color))
              for name, color in policy_colors().items()}  # the notebook's colours: one per policy of conf/cache/
    for name in ("memory_latency_vs_keep.png", "memory_latency_vs_batch.png", "step_latency.png"):
        for policy in ("linear", "window"):  # both are drawn, each in its own colour
            assert len(pixels_near(figures / name, colors[policy])) > 30, (name, policy)
    assert len(pixels_near(figures / "memory_latency_vs_keep.png", colors["streamingllm"])) > 30
    for policy in ("linear", "window"):  # the fidelity figure draws both policies
        assert len(pixels_near(figures / "fidelity_vs_keep.png", colors[policy])) > 30, policy
    rows = {color: pixels_near(figures / grid, color, tolerance=0)[:, 0] for color in SAMPLE_COLORS.values()}
    assert all(len(rows[color]) > 2000 for color in list(SAMPLE_COLORS.values())[:3])
    assert len(rows[SAMPLE_COLORS["linear", "1/4", 1]]) == 0  # another seed never joins the seed-0 grid
    full, linear, window = (rows[SAMPLE_COLORS[key, keep, 0]].mean() for key, keep in
                            (("full", "1"), ("linear", "1/4"), ("window", "1/4")))
    assert full < linear < window  # full on top, then the policies by keep and name
    text = cell_text(with_runs["figures"], "samples")
    assert "NOTE" not in text and text.count("saved") == 1


def test_figures_skip_absent_data_with_a_note(paper_only):
    figures = paper_only["paths"]["LINEAREVAL_FIGURES"]
    assert sorted(path.name for path in figures.iterdir()) == ["fid_vs_keep.png", "memory_latency_vs_keep.png"]
    notebook = paper_only["figures"]
    assert "paper's numbers only" in cell_text(notebook, "efficiency_vs_keep")
    for tag in ("efficiency_vs_batch", "samples", "step_latency", "fidelity_vs_keep"):
        assert "NOTE" in cell_text(notebook, tag) and "saved" not in cell_text(notebook, tag), tag


def render_example(out: Path) -> None:
    """The figures notebook on the fixture data; copies its memory/latency-against-keep figure to `out`."""
    with tempfile.TemporaryDirectory() as folder:
        paths = build_results(Path(folder), runs=True)
        execute("figures", paths, LINEAREVAL_FIGURE_LABEL="FIXTURE DATA: synthetic numbers from "
                "tests/test_notebooks.py, not measurements")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths["LINEAREVAL_FIGURES"] / "memory_latency_vs_keep.png", out)
    print(f"wrote {out}")


if __name__ == "__main__":
    render_example(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "results" / "figures" /
                   "example_fixture_figures.png")
