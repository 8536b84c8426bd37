"""DPG-Bench scoring (ELLA, https://arxiv.org/abs/2403.05135): yes/no VQA questions with a parent rule.

Official release: github.com/TencentQQGYLab/ELLA, `dpg_bench/` (`compute_dpg_bench.py`, `dpg_bench.csv`,
`prompts/`). The arithmetic mirrors `compute_dpg_bench.py` at commit 3c228f1 (line numbers below):

- an answer passes iff it is exactly the string "yes" (L135);
- one pass over an item's questions in file order zeroes a question if any listed parent's *current*
  score is 0 (L140-153); zeros therefore run down chains whose parents come first in the file;
- image score = mean over all the item's questions; prompt score = mean over its images (L155-157);
  overall = mean over prompts (L219), reported x100 (L249);
- category scores pool question scores over all prompts (question-weighted, not per-prompt means),
  keyed by the `tuple` text before "(" (L2, e.g. "entity - whole", "global -") and that before "-"
  (L1, e.g. "entity") (L207-245). The columns `category_broad`/`category_detailed` are not used.

Two known defects of the official script, and the two scorings offered (`SCORINGS`):
- it skips the first data row of the CSV (ELLA issue #61: a question of partiprompts97); when other
  questions depend on it, the resulting KeyError (caught, L213) drops that whole prompt from every score;
- it takes category scores from the raw answers (before the parent rule) of the *last* image only
  (ELLA issue #60).
`official` (the default) reproduces the script's numbers exactly, both quirks included, so ours compare
with published ones; `corrected` keeps the first row and pools every image's answers into the category
scores (still raw answers: a category score is the VQA accuracy on its questions, as officially).

The official protocol draws 4 samples per prompt as one 2x2 grid and crops it top-left, top-right,
bottom-left, bottom-right (L111-118, `PIC_NUM=4` in dist_eval.sh); here image k of a prompt plays crop k
(`split_grid` turns an official grid into that list). Scores are in percent, as the official output.
"""

from __future__ import annotations

import csv
import itertools
import logging
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("item_id", "proposition_id", "dependency", "tuple", "question_natural_language")
CATEGORIES = ("entity", "attribute", "relation", "global", "other")  # L1 names in the official CSV
CATEGORY_RULES = ("official", "all_images")
MPLUG_MODEL = "damo/mplug_visual-question-answering_coco_large_en"
RELEASE = "dpg_bench/dpg_bench.csv of github.com/TencentQQGYLab/ELLA"


@dataclass(frozen=True)
class Scoring:
    """How the official script's two quirks are treated (module docstring)."""

    skip_first_row: bool
    category_rule: str


SCORINGS = {"official": Scoring(skip_first_row=True, category_rule="official"),
            "corrected": Scoring(skip_first_row=False, category_rule="all_images")}


@dataclass(frozen=True)
class Question:
    """One proposition of a prompt; `parents` lists proposition ids (the CSV's "0" = none is dropped)."""

    item_id: str
    proposition_id: int
    parents: tuple[int, ...]
    category: str  # L1, e.g. "entity"
    detail: str  # L2, e.g. "entity - whole"; "global -" for global tuples, as the official split gives
    question: str


class VQAModel(Protocol):
    """Answers one question per image: `answer([img_0, ...], [q_0, ...])[i]` answers q_i about img_i."""

    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str]: ...


def _parse_row(row: dict[str, str], number: int, path: Path) -> Question:
    item_id = row["item_id"]
    if any(row[column] is None for column in REQUIRED_COLUMNS):
        raise ValueError(f"{path}: data row {number} (item {item_id!r}) has fewer fields than the header")
    try:
        proposition_id = int(row["proposition_id"])
        dependency = [int(part.strip()) for part in row["dependency"].split(",")]
    except ValueError:
        raise ValueError(f"{path}: data row {number} (item {item_id!r}): proposition_id "
                         f"{row['proposition_id']!r} / dependency {row['dependency']!r} must be integers "
                         "(dependency: '0' for none, else comma-separated proposition ids)") from None
    if proposition_id < 1:
        raise ValueError(f"{path}: data row {number} (item {item_id!r}): proposition_id must be >= 1 "
                         "(0 means 'no parent' in the dependency column)")
    detail = row["tuple"].split("(")[0].strip()
    return Question(item_id, proposition_id, tuple(d for d in dependency if d != 0),
                    detail.split("-")[0].strip(), detail, row["question_natural_language"])


def _check_graph(item_id: str, questions: list[Question], path: Path) -> None:
    """Duplicate ids, parents the item lacks, and cycles are data errors the official code would mis-score."""
    ids = [q.proposition_id for q in questions]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{path}: item {item_id!r} lists proposition ids {duplicates} more than once")
    parents = {q.proposition_id: q.parents for q in questions}
    for q in questions:
        dangling = [p for p in q.parents if p not in parents]
        if dangling:
            raise ValueError(f"{path}: item {item_id!r}, proposition {q.proposition_id} depends on "
                             f"{dangling}, which the item does not have")
    done: set[int] = set()

    def visit(node: int, trail: list[int]) -> None:
        if node in trail:
            cycle = " -> ".join(map(str, [*trail[trail.index(node):], node]))
            raise ValueError(f"{path}: item {item_id!r} has a dependency cycle {cycle}")
        if node not in done:
            for parent in parents[node]:
                visit(parent, [*trail, node])
            done.add(node)

    for node in parents:
        visit(node, [])


def load_dpg_questions(csv_path: str | Path, skip_first_row: bool = False) -> dict[str, list[Question]]:
    """Questions per item (prompt id = prompt file stem), in file order, from the official CSV."""
    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"DPG-Bench question file {path} does not exist; it is {RELEASE}")
    # UTF-8 whatever the locale (27 prompts are not ASCII); "-sig" drops a byte-order mark, as pandas does.
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks columns {missing} (has {reader.fieldnames}); expected {RELEASE}")
        rows = list(reader)
    questions = [_parse_row(row, number, path) for number, row in enumerate(rows, start=1)]
    dropped = questions.pop(0) if skip_first_row and questions else None
    by_item: dict[str, list[Question]] = {}
    for previous, q in zip([None, *questions], questions):
        if q.item_id in by_item and previous is not None and previous.item_id != q.item_id:
            log.warning("%s: rows of item %r are not contiguous; the official loader keeps only the last "
                        "block, we keep all", path, q.item_id)
        by_item.setdefault(q.item_id, []).append(q)
    if dropped is not None:
        survivors = by_item.get(dropped.item_id, [])
        if any(dropped.proposition_id in q.parents for q in survivors):
            del by_item[dropped.item_id]  # the official scorer hits a KeyError and skips the prompt
        log.warning("skip_first_row: dropped proposition %d of item %r%s, as the official loader does",
                    dropped.proposition_id, dropped.item_id, "" if dropped.item_id in by_item else " (whole item)")
    for item_id, item_questions in by_item.items():
        _check_graph(item_id, item_questions, path)
        seen = set()
        for q in item_questions:
            if any(p not in seen for p in q.parents):
                log.warning("%s: item %r lists proposition %d before one of its parents %s; the official "
                            "single pass then sees that parent's raw answer", path, item_id,
                            q.proposition_id, q.parents)
            seen.add(q.proposition_id)
    return by_item


def judge(answer: str) -> float:
    """1.0 iff the VQA answer is exactly "yes" (no case folding or stripping, as the official L135)."""
    return float(answer == "yes")


def score_image(questions: Sequence[Question], answers: Sequence[str]) -> dict[int, float]:
    """Per-proposition scores of one image after the parent rule, in the official single pass."""
    if len(answers) != len(questions):
        raise ValueError(f"{len(answers)} answers for {len(questions)} questions")
    scores = {q.proposition_id: judge(answer) for q, answer in zip(questions, answers)}
    for q in questions:  # file order, updated in place: a parent zeroed earlier in the pass counts as failed
        if any(scores[parent] == 0 for parent in q.parents):
            scores[q.proposition_id] = 0.0
    return scores


def _snake(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def score_dpg(questions_by_item: Mapping[str, Sequence[Question]],
              answers_by_item_image: Mapping[str, Sequence[Sequence[str]]],
              category_rule: str = "official") -> dict:
    """Official DPG-Bench arithmetic over the items answered; `answers[item][k][i]` answers question i, image k.

    Returns flat scalars (`dpg_score`, `dpg_<L1 category>`, counts, the rule) for metrics.json, plus
    `details` (L2 -> score), `per_prompt` (item -> score) and `per_image` (item -> [score per image]).
    All scores in percent. A category with no question scored is None.
    """
    if category_rule not in CATEGORY_RULES:
        raise ValueError(f"category_rule must be one of {CATEGORY_RULES}, got {category_rule!r}")
    per_image: dict[str, list[float]] = {}
    by_category: dict[str, list[float]] = defaultdict(list)
    by_detail: dict[str, list[float]] = defaultdict(list)
    for item_id, image_answers in answers_by_item_image.items():
        if item_id not in questions_by_item:
            raise ValueError(f"answers for item {item_id!r}, which the question file does not have")
        if not image_answers:
            raise ValueError(f"item {item_id!r} has no images to score")
        questions = questions_by_item[item_id]
        image_scores = []
        for answers in image_answers:
            scores = score_image(questions, answers)
            image_scores.append(sum(scores.values()) / len(scores))
        per_image[item_id] = image_scores
        # Official: raw answers (before the parent rule) of the last crop only.
        for answers in image_answers[-1:] if category_rule == "official" else image_answers:
            for q, answer in zip(questions, answers):
                by_category[q.category].append(judge(answer))
                by_detail[q.detail].append(judge(answer))
    if not per_image:
        raise ValueError("no answers to score")
    if len(per_image) < len(questions_by_item):
        log.warning("DPG-Bench: scored %d of %d prompts", len(per_image), len(questions_by_item))
    per_prompt = {item_id: sum(s) / len(s) for item_id, s in per_image.items()}
    result: dict = {"dpg_score": float(np.mean(list(per_prompt.values())) * 100)}
    for name in [*CATEGORIES, *sorted(set(by_category) - set(CATEGORIES))]:
        scores = by_category.get(name)
        result[f"dpg_{_snake(name)}"] = float(np.mean(scores) * 100) if scores else None
    result.update(
        dpg_num_prompts=len(per_prompt), dpg_num_images=sum(map(len, per_image.values())),
        dpg_category_rule=category_rule,
        details={name: float(np.mean(scores) * 100) for name, scores in sorted(by_detail.items())},
        per_prompt={item_id: score * 100 for item_id, score in per_prompt.items()},
        per_image={item_id: [score * 100 for score in scores] for item_id, scores in per_image.items()})
    return result


def _pairs(images_by_item: Mapping[str, Sequence[Image.Image]],
           questions_by_item: Mapping[str, Sequence[Question]]) -> Iterator[tuple[str, int, Image.Image, str]]:
    for item_id, images in images_by_item.items():
        for index in range(len(images)):
            image = images[index]  # fetched once per image, so a lazy sequence decodes it once
            for q in questions_by_item[item_id]:
                yield item_id, index, image, q.question


def evaluate_dpg(images_by_item: Mapping[str, Sequence[Image.Image]],
                 questions_by_item: Mapping[str, Sequence[Question]], vqa: VQAModel,
                 batch_size: int = 32, category_rule: str = "official") -> dict:
    """Ask `vqa` every question about every image (batched), then `score_dpg`; adds `answers` and the judge."""
    unknown = [item_id for item_id in images_by_item if item_id not in questions_by_item]
    if unknown:
        raise ValueError(f"images for items the question file does not have: {unknown[:5]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    answers = {item_id: [[] for _ in images] for item_id, images in images_by_item.items()}
    total = sum(len(images) * len(questions_by_item[item_id]) for item_id, images in images_by_item.items())
    batch: list[tuple[str, int, Image.Image, str]] = []
    with tqdm(total=total, desc="DPG-Bench VQA", unit="question") as progress:
        for pair in itertools.chain(_pairs(images_by_item, questions_by_item), [None]):
            if pair is not None:
                batch.append(pair)
            if batch and (pair is None or len(batch) == batch_size):
                got = list(vqa.answer([p[2] for p in batch], [p[3] for p in batch]))
                if len(got) != len(batch):
                    raise RuntimeError(f"{type(vqa).__name__} gave {len(got)} answers to {len(batch)} questions")
                for (item_id, index, _, _), answer in zip(batch, got):
                    answers[item_id][index].append(answer)
                progress.update(len(batch))
                batch = []
    result = score_dpg(questions_by_item, answers, category_rule)
    result["dpg_vqa_model"] = getattr(vqa, "name", type(vqa).__name__)
    result["answers"] = answers
    return result


def split_grid(grid: Image.Image, resolution: int, count: int = 4) -> list[Image.Image]:
    """The official 2x2 grid's first `count` crops, in its order: top-left, top-right, bottom-left, bottom-right."""
    if not 1 <= count <= 4:
        raise ValueError(f"a 2x2 grid holds 1 to 4 images, got count={count}")
    if grid.width < 2 * resolution or grid.height < 2 * resolution:
        raise ValueError(f"grid is {grid.width}x{grid.height}, too small for 2x2 images of {resolution} px")
    corners = [(0, 0), (resolution, 0), (0, resolution), (resolution, resolution)]
    return [grid.crop((x, y, x + resolution, y + resolution)) for x, y in corners[:count]]


class MPlugVQA:
    """The official judge: ModelScope's mPLUG-large VQA pipeline (COCO-finetuned), one pair per call."""

    def __init__(self, model_id: str = MPLUG_MODEL, device: str = "cuda"):
        try:
            from modelscope.pipelines import pipeline
            from modelscope.utils.constant import Tasks
        except ImportError as error:
            raise ImportError(
                "MPlugVQA needs the `modelscope` package with its multi-modal extras "
                "(pip install 'modelscope[multi-modal]'); without it use TransformersVQA, whose DPG-Bench "
                "numbers are not comparable to published ones") from error
        self.name = f"modelscope:{model_id}"
        self._pipeline = pipeline(Tasks.visual_question_answering, model=model_id, device=device)

    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        # The official script calls the pipeline one pair at a time; its batching is not relied on.
        return [self._pipeline({"image": image, "question": question})["text"]
                for image, question in zip(images, questions, strict=True)]


class TransformersVQA:
    """Documented alternative judge: a transformers VQA model (generative BLIP, or a classifier like ViLT).

    Not the official mPLUG-large, so its scores are not comparable to published DPG-Bench numbers; only
    compare runs judged by the same model. Answers are stripped and lower-cased because the judge is an
    exact "yes" (BLIP and ViLT already answer in lower case). `model`/`processor` may be passed built.
    """

    def __init__(self, model_id: str = "Salesforce/blip-vqa-base", device: str | None = None,
                 dtype=None, max_new_tokens: int = 10, model=None, processor=None):
        from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor

        self.name = f"transformers:{model_id}"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.max_new_tokens = max_new_tokens
        self.processor = processor or AutoProcessor.from_pretrained(model_id)
        model = model or AutoModelForVisualQuestionAnswering.from_pretrained(model_id, dtype=dtype)
        self.model = model.to(self.device).eval()

    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        inputs = self.processor(images=[image.convert("RGB") for image in images], text=list(questions),
                                return_tensors="pt", padding=True).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            if self.model.can_generate():
                tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
                texts = self.processor.batch_decode(tokens, skip_special_tokens=True)
            else:
                labels = self.model(**inputs).logits.argmax(-1).tolist()
                texts = [self.model.config.id2label[label] for label in labels]
        return [text.strip().lower() for text in texts]
