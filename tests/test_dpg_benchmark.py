"""benchmark=dpg through the runner on a tiny Janus: prompts from files, 2 images each, stub VQA answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lineareval.runner import run
from test_dpg import ROWS, write_csv


class AlwaysYes:
    """A VQA stand-in that affirms everything: every question passes, so every score is 100."""

    name = "always-yes"

    def answer(self, images, questions):
        return ["yes"] * len(questions)


@pytest.fixture
def dpg_files(tmp_path) -> tuple[Path, Path]:
    csv_path = write_csv(tmp_path / "dpg_bench.csv", ROWS)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "alpha.txt").write_text("a red apple\n")
    (prompts / "beta.txt").write_text("a green pear")
    return csv_path, prompts


def test_dpg_run_scores_every_prompt(make_config, janus_folder, dpg_files):
    csv_path, prompts = dpg_files
    cfg = make_config("model=janus_pro_1b", f"model.path={janus_folder}", "benchmark=dpg",
                      f"benchmark.questions={csv_path}", f"benchmark.prompts_dir={prompts}",
                      "benchmark.images_per_prompt=2", "benchmark.vqa._target_=test_dpg_benchmark.AlwaysYes",
                      "benchmark.scoring=corrected", "batch_size=4")  # official scoring skips alpha (first row)
    record = run(cfg)
    assert record["dpg_score"] == pytest.approx(100.0) and record["dpg_num_prompts"] == 2
    assert record["dpg_num_images"] == 4 and record["dpg_vqa_model"] == "always-yes"
    assert record["dpg_scoring"] == "corrected"
    tokens = np.load(Path(cfg.run_dir) / "tokens.npz")
    assert list(tokens["item_ids"]) == ["alpha", "beta"] and list(tokens["prompts"]) == ["a red apple", "a green pear"]
    details = json.loads((Path(cfg.run_dir) / "dpg_details.json").read_text())
    assert set(details["answers"]) == {"alpha", "beta"}


def test_dpg_without_release_files_stops_before_generating(make_config, janus_folder, tmp_path):
    cfg = make_config("model=janus_pro_1b", f"model.path={janus_folder}", "benchmark=dpg",
                      f"benchmark.questions={tmp_path / 'missing.csv'}", f"benchmark.prompts_dir={tmp_path}")
    with pytest.raises(FileNotFoundError, match="TencentQQGYLab/ELLA"):
        run(cfg)
    assert not (Path(cfg.run_dir) / "tokens.npz").exists()


# ----------------------------------------------------------------- official and corrected scoring


def _scored_run(tmp_path, scoring: str | None) -> dict:
    """DPGBench.evaluate on a run folder of 2 images per prompt, answered with test_dpg's ANSWERS."""
    from lineareval.benchmarks.dpg import DPGBench
    from test_dpg import StubVQA, load_dpg_questions

    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = [0, 1, 100, 101]  # the stub reads item * 100 + image index from the red channel
    np.savez(run_dir / "samples.npz", arr_0=images)
    np.savez(run_dir / "tokens.npz", item_ids=np.array(["alpha", "beta"]), prompt_index=np.array([0, 0, 1, 1]))
    csv_path = write_csv(tmp_path / "dpg_bench.csv", ROWS)
    options = {} if scoring is None else {"scoring": scoring}
    bench = DPGBench(questions=str(csv_path), prompts_dir=str(tmp_path), vqa={"_target_": "test_dpg.StubVQA",
                     "questions": load_dpg_questions(csv_path)}, **options)
    return bench.evaluate(run_dir)


def test_default_scoring_is_the_official_scripts_number_quirks_included(tmp_path):
    """compute_dpg_bench.py skips the CSV's first row: alpha's question 1 goes, its children's lookup of it
    raises, and the whole prompt is skipped; categories come from the last image's raw answers."""
    record = _scored_run(tmp_path, None)
    assert record["dpg_scoring"] == "official" and record["dpg_num_prompts"] == 1
    assert record["dpg_score"] == pytest.approx(100 * (5 / 6 + 3 / 6) / 2, abs=1e-9)  # beta only
    # beta's last image answers [yes no yes yes yes no]: entity 1,2 -> 1,0; relation 3; other 4,5; global 6
    assert record["dpg_entity"] == pytest.approx(50.0) and record["dpg_relation"] == pytest.approx(100.0)
    assert record["dpg_other"] == pytest.approx(100.0) and record["dpg_global"] == pytest.approx(0.0)
    assert record["dpg_attribute"] is None


def test_corrected_scoring_keeps_the_first_row_and_pools_every_image(tmp_path):
    from test_dpg import EXPECTED_ALL_IMAGES, EXPECTED_OFFICIAL

    record = _scored_run(tmp_path, "corrected")
    assert record["dpg_scoring"] == "corrected" and record["dpg_num_prompts"] == 2
    assert record["dpg_score"] == pytest.approx(EXPECTED_OFFICIAL["dpg_score"], abs=1e-9)
    for key, value in EXPECTED_ALL_IMAGES.items():
        assert record[key] == pytest.approx(value, abs=1e-9), key
    with pytest.raises(ValueError, match="scoring"):
        _scored_run(tmp_path, "fixed")


def test_prompt_files_are_read_as_utf8_without_a_byte_order_mark(tmp_path):
    from types import SimpleNamespace

    from lineareval.benchmarks.dpg import DPGBench

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "crème.txt").write_text("\ufeffa café au lait, crème brûlée\n", encoding="utf-8")
    csv_path = write_csv(tmp_path / "dpg.csv", [("crème", 1, "0", "entity - whole (café)", "Is there a café?")],
                         encoding="utf-8-sig")
    bench = DPGBench(questions=str(csv_path), prompts_dir=str(prompts), images_per_prompt=1)
    samples = bench.samples(SimpleNamespace(model=SimpleNamespace(name="m")), SimpleNamespace(conditioning="text"))
    assert samples.conditions == ["a café au lait, crème brûlée"]


# ------------------------------------------------------------------ images made by another codebase


def _grid(codes: list[int], side: int) -> Image.Image:
    """A 2x2 grid in the official order (TL, TR, BL, BR); crop k is filled with red value codes[k]."""
    grid = Image.new("RGB", (2 * side, 2 * side))
    for (x, y), code in zip([(0, 0), (side, 0), (0, side), (side, side)], codes):
        grid.paste((code, 0, 0), (x, y, x + side, y + side))
    return grid


class GridVQA:
    """Answers test_dpg's ANSWERS for crops coded item * 100 + 20 * image (tolerant of JPEG's rounding)."""

    name = "grid-stub"

    def answer(self, images, questions):
        from test_dpg import ANSWERS, ROWS

        out = []
        for image, question in zip(images, questions):
            code = image.convert("RGB").getpixel((4, 4))[0]
            item = ["alpha", "beta"][int(code >= 90)]
            index = round((code - 100 * (item == "beta")) / 20)
            asked = [row[4] for row in ROWS if row[0] == item].index(question)
            out.append(ANSWERS[item][index][asked])
        return out


def test_stage_evaluate_scores_external_grid_images(make_config, tmp_path):
    from test_dpg import EXPECTED_OFFICIAL

    images = tmp_path / "their_samples"
    images.mkdir()
    _grid([0, 20, 40, 60], 16).save(images / "alpha.png")
    _grid([100, 120, 140, 160], 16).save(images / "beta.jpg", quality=100, subsampling=0)
    (images / "notes.txt").write_text("not an image")
    _grid([0, 0, 0, 0], 16).save(images / "unknown_item.png")  # not in the CSV: skipped, as officially
    rows = [("zeta", 1, "0", "global - (photo)", "Is this a photo?"), *ROWS]  # the official loader drops zeta
    csv_path = write_csv(tmp_path / "dpg_bench.csv", rows)
    cfg = make_config("benchmark=dpg", f"benchmark.questions={csv_path}", f"benchmark.prompts_dir={tmp_path}",
                      f"benchmark.images_dir={images}", "benchmark.resolution=16", "benchmark.images_per_prompt=2",
                      "benchmark.vqa._target_=test_dpg_benchmark.GridVQA", "stage=evaluate")
    record = run(cfg)
    assert record["dpg_score"] == pytest.approx(EXPECTED_OFFICIAL["dpg_score"], abs=1e-9)
    assert record["dpg_entity"] == pytest.approx(EXPECTED_OFFICIAL["dpg_entity"], abs=1e-9)
    assert record["dpg_num_prompts"] == 2 and record["dpg_num_images"] == 4
    assert record["dpg_images_dir"] == str(images) and record["model"] == "external"
    assert not (Path(cfg.run_dir) / "tokens.npz").exists()  # nothing was generated
    assert run(cfg) == record  # finished: a rerun skips it
    with pytest.raises(ValueError, match="stage=evaluate"):
        run(make_config("benchmark=dpg", f"benchmark.questions={csv_path}", f"benchmark.prompts_dir={tmp_path}",
                        f"benchmark.images_dir={images}", f"run_dir={tmp_path / 'other'}"))
