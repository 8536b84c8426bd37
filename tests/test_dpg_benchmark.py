"""benchmark=dpg through the runner on a tiny Janus: prompts from files, 2 images each, stub VQA answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

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
                      "batch_size=4")
    record = run(cfg)
    assert record["dpg_score"] == pytest.approx(100.0) and record["dpg_num_prompts"] == 2
    assert record["dpg_num_images"] == 4 and record["dpg_vqa_model"] == "always-yes"
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
