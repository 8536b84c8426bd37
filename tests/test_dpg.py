"""DPG-Bench scoring on a hand-made question graph whose scores are worked out by hand below."""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from lineareval.metrics.dpg import (
    MPlugVQA, Question, TransformersVQA, evaluate_dpg, load_dpg_questions, score_dpg, score_image, split_grid,
)

COLUMNS = ["item_id", "text", "keywords", "proposition_id", "dependency", "category_broad",
           "category_detailed", "tuple", "question_natural_language"]
# (item, id, dependency, tuple, question). alpha: chain 1 -> 3 -> 4, question 6 with parents 1 and 5.
ROWS = [
    ("alpha", 1, "0", "entity - whole (cat)", "Is there a cat?"),
    ("alpha", 2, "1", "attribute - color (cat, black)", "Is the cat black?"),
    ("alpha", 3, "1", "entity - part (cat's collar)", "Does the cat wear a collar?"),
    ("alpha", 4, "3", "attribute - color (collar, red)", "Is the collar red?"),
    ("alpha", 5, "0", "entity - whole (sofa)", "Is there a sofa?"),
    ("alpha", 6, "1,5", "relation - spatial (cat, sofa, on)", "Is the cat on the sofa?"),
    ("alpha", 7, "0", "global - (photo)", "Is this a photo?"),
    ("beta", 1, "0", "entity - whole (clock)", "Is there a clock?"),
    ("beta", 2, "0", "entity - whole (wall)", "Is there a wall?"),
    ("beta", 3, "1,2", "relation - non-spatial (clock, wall, hang)", "Does the clock hang on the wall?"),
    ("beta", 4, "1", "other - count (clock, ==2)", "Are there two clocks?"),
    ("beta", 5, "1", 'other - text (clock, "XII")', 'Does the clock show "XII"?'),
    ("beta", 6, "0", "global - (painting)", "Is this a painting?"),
]
# Answers per item and image, in question order. "Yes" is not "yes": the official judge is exact.
ANSWERS = {
    "alpha": [["no", "yes", "yes", "yes", "yes", "yes", "yes"],
              ["yes", "no", "yes", "yes", "no", "yes", "Yes"]],
    "beta": [["yes", "yes", "yes", "yes", "no", "yes"],
             ["yes", "no", "yes", "yes", "yes", "no"]],
}


def write_csv(path: Path, rows, columns=COLUMNS, encoding: str = "utf-8") -> Path:
    with path.open("w", newline="", encoding=encoding) as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for item, pid, dep, tup, question in rows:
            broad, detailed = (part.strip() for part in tup.split("(")[0].split("-", 1))
            row = dict(zip(COLUMNS, [item, f"prompt {item}", "", pid, dep, broad, detailed, tup, question]))
            writer.writerow([row[c] for c in columns])
    return path


@pytest.fixture
def questions(tmp_path):
    return load_dpg_questions(write_csv(tmp_path / "dpg.csv", ROWS))


def test_loader_parses_graph_and_categories(questions):
    assert list(questions) == ["alpha", "beta"]
    assert [q.proposition_id for q in questions["alpha"]] == [1, 2, 3, 4, 5, 6, 7]
    assert questions["alpha"][5] == Question("alpha", 6, (1, 5), "relation", "relation - spatial",
                                             "Is the cat on the sofa?")
    assert questions["alpha"][0].parents == ()  # "0" = no parent
    assert questions["alpha"][6].detail == "global -" and questions["alpha"][6].category == "global"
    assert questions["beta"][4].question == 'Does the clock show "XII"?'


def test_score_image_parent_rule(questions):
    alpha, beta = questions["alpha"], questions["beta"]
    # 1 fails: its children 2, 3, 6 fail, and 4 fails through 3 although 3 and 4 answered yes.
    assert score_image(alpha, ANSWERS["alpha"][0]) == {1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 0, 7: 1}
    # 6 has parents 1 (passes) and 5 (fails): it fails. 7 answered "Yes", not "yes".
    assert score_image(alpha, ANSWERS["alpha"][1]) == {1: 1, 2: 0, 3: 1, 4: 1, 5: 0, 6: 0, 7: 0}
    assert score_image(beta, ANSWERS["beta"][0]) == {1: 1, 2: 1, 3: 1, 4: 1, 5: 0, 6: 1}
    assert score_image(beta, ANSWERS["beta"][1]) == {1: 1, 2: 0, 3: 0, 4: 1, 5: 1, 6: 0}
    with pytest.raises(ValueError, match="6 answers for 7 questions"):
        score_image(alpha, ANSWERS["beta"][0])


def test_score_image_single_pass_in_file_order():
    # Official rule: one pass in file order. Child 3 comes before its parent 2, so it sees 2's raw "yes"
    # and passes, although 2 is then zeroed because 1 failed.
    q = [Question("x", 3, (2,), "entity", "entity - part", "c?"), Question("x", 1, (), "entity", "entity - whole", "a?"),
         Question("x", 2, (1,), "entity", "entity - part", "b?")]
    assert score_image(q, ["yes", "no", "yes"]) == {3: 1, 1: 0, 2: 0}


EXPECTED_OFFICIAL = {
    # Image scores: alpha 2/7, 3/7; beta 5/6, 3/6. Prompt = mean over images.
    "per_prompt": {"alpha": 100 * (2 / 7 + 3 / 7) / 2,   # 5/14 = 35.714...
                   "beta": 100 * (5 / 6 + 3 / 6) / 2},   # 2/3 = 66.666...
    "dpg_score": 100 * (5 / 14 + 2 / 3) / 2,             # 43/84 = 51.190...
    # Categories: raw answers of the LAST image only (alpha [y n y y n y Yes], beta [y n y y y n]).
    "dpg_entity": 100 * 3 / 5,       # alpha 1,3,5 = 1,1,0; beta 1,2 = 1,0
    "dpg_attribute": 100 * 1 / 2,    # alpha 2,4 = 0,1
    "dpg_relation": 100 * 2 / 2,     # alpha 6 = 1 (its parent 5 failed: ignored here); beta 3 = 1
    "dpg_global": 100 * 0 / 2,       # alpha 7 = "Yes" -> 0; beta 6 = 0
    "dpg_other": 100 * 2 / 2,        # beta 4,5 = 1,1
    "details": {"attribute - color": 50.0, "entity - part": 100.0, "entity - whole": 100 * 2 / 4,
                "global -": 0.0, "other - count": 100.0, "other - text": 100.0,
                "relation - non-spatial": 100.0, "relation - spatial": 100.0},
}
EXPECTED_ALL_IMAGES = {  # raw answers of both images; image 0: alpha [n y y y y y y], beta [y y y y n y]
    "dpg_entity": 100 * 7 / 10,      # image 0: alpha 0,1,1 + beta 1,1 = 4; image 1: 3
    "dpg_attribute": 100 * 3 / 4,    # image 0: 1,1; image 1: 0,1
    "dpg_relation": 100 * 4 / 4,     # 1,1 + 1,1
    "dpg_global": 100 * 2 / 4,       # 1,1 + 0,0
    "dpg_other": 100 * 3 / 4,        # 1,0 + 1,1
}


def test_score_dpg_official_arithmetic(questions):
    result = score_dpg(questions, ANSWERS)
    for key in ("dpg_score", "dpg_entity", "dpg_attribute", "dpg_relation", "dpg_global", "dpg_other"):
        assert result[key] == pytest.approx(EXPECTED_OFFICIAL[key], abs=1e-9), key
    assert result["dpg_score"] == pytest.approx(51.19047619047619, abs=1e-9)
    assert result["per_prompt"] == pytest.approx(EXPECTED_OFFICIAL["per_prompt"], abs=1e-9)
    assert result["per_image"]["alpha"] == pytest.approx([100 * 2 / 7, 100 * 3 / 7], abs=1e-9)
    assert result["details"] == pytest.approx(EXPECTED_OFFICIAL["details"], abs=1e-9)
    assert (result["dpg_num_prompts"], result["dpg_num_images"], result["dpg_category_rule"]) == (2, 4, "official")


def test_score_dpg_all_images_rule_changes_only_categories(questions):
    result = score_dpg(questions, ANSWERS, category_rule="all_images")
    assert result["dpg_score"] == pytest.approx(EXPECTED_OFFICIAL["dpg_score"], abs=1e-9)
    for key, value in EXPECTED_ALL_IMAGES.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key
    with pytest.raises(ValueError, match="category_rule"):
        score_dpg(questions, ANSWERS, category_rule="last")


def test_score_dpg_subset_and_missing_category(questions, caplog):
    with caplog.at_level(logging.WARNING):
        result = score_dpg(questions, {"beta": ANSWERS["beta"]})
    assert "scored 1 of 2 prompts" in caplog.text
    assert result["dpg_score"] == pytest.approx(100 * 2 / 3, abs=1e-9)
    assert result["dpg_attribute"] is None  # beta has no attribute question
    with pytest.raises(ValueError, match="'gamma'"):
        score_dpg(questions, {"gamma": [["yes"]]})


class StubVQA:
    """Answers from ANSWERS, recognising the image by its red channel (= item index * 100 + image index)."""

    name = "stub"

    def __init__(self, questions):
        self.questions, self.batches = questions, []

    def answer(self, images, questions):
        self.batches.append(len(images))
        out = []
        for image, question in zip(images, questions):
            code = image.getpixel((0, 0))[0]
            item = ["alpha", "beta"][code // 100]
            index = [q.question for q in self.questions[item]].index(question)
            out.append(ANSWERS[item][code % 100][index])
        return out


def test_evaluate_dpg_batches_and_scores(questions):
    images = {item: [Image.new("RGB", (8, 8), (100 * i + k, 0, 0)) for k in range(2)]
              for i, item in enumerate(["alpha", "beta"])}
    vqa = StubVQA(questions)
    result = evaluate_dpg(images, questions, vqa, batch_size=3)
    assert vqa.batches == [3] * 8 + [2]  # 2 * 7 + 2 * 6 = 26 questions
    assert result["answers"] == ANSWERS
    assert result["dpg_score"] == pytest.approx(EXPECTED_OFFICIAL["dpg_score"], abs=1e-9)
    assert result["dpg_entity"] == pytest.approx(EXPECTED_OFFICIAL["dpg_entity"], abs=1e-9)
    assert result["dpg_vqa_model"] == "stub"
    with pytest.raises(ValueError, match="gamma"):
        evaluate_dpg({"gamma": images["alpha"]}, questions, vqa, batch_size=3)


def test_split_grid_official_crop_order():
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # TL, TR, BL, BR
    grid = Image.new("RGB", (8, 8))
    for (x, y), color in zip([(0, 0), (4, 0), (0, 4), (4, 4)], colors):
        grid.paste(color, (x, y, x + 4, y + 4))
    crops = split_grid(grid, resolution=4)
    assert [crop.size for crop in crops] == [(4, 4)] * 4
    assert [crop.getpixel((2, 2)) for crop in crops] == colors
    assert len(split_grid(grid, 4, count=1)) == 1
    with pytest.raises(ValueError, match="too small"):
        split_grid(grid, resolution=5)


def test_skip_first_row_mirrors_official_loader(tmp_path, caplog):
    path = write_csv(tmp_path / "dpg.csv", ROWS)
    with caplog.at_level(logging.WARNING):
        skipped = load_dpg_questions(path, skip_first_row=True)
    # alpha's proposition 1 goes; its children then dangle, so the official scorer drops the whole prompt.
    assert list(skipped) == ["beta"] and "(whole item)" in caplog.text
    # If the first row is nobody's parent, only that question goes.
    path = write_csv(tmp_path / "dpg2.csv", [("zeta", 1, "0", "global - (photo)", "Is this a photo?"), *ROWS])
    skipped = load_dpg_questions(path, skip_first_row=True)
    assert list(skipped) == ["alpha", "beta"]


def test_loader_warns_when_child_precedes_parent(tmp_path, caplog):
    rows = [("x", 2, "1", "entity - part (b)", "b?"), ("x", 1, "0", "entity - whole (a)", "a?")]
    with caplog.at_level(logging.WARNING):
        loaded = load_dpg_questions(write_csv(tmp_path / "dpg.csv", rows))
    assert [q.proposition_id for q in loaded["x"]] == [2, 1]
    assert "before one of its parents" in caplog.text


@pytest.mark.parametrize("rows, columns, message", [
    (ROWS, [c for c in COLUMNS if c != "dependency"], r"lacks columns \['dependency'\]"),
    ([*ROWS[:7], ("alpha", 8, "1,9", "entity - whole (dog)", "Is there a dog?")], COLUMNS,
     r"'alpha', proposition 8 depends on \[9\]"),
    ([("x", 1, "2", "entity - whole (a)", "a?"), ("x", 2, "3", "entity - whole (b)", "b?"),
      ("x", 3, "1", "entity - whole (c)", "c?")], COLUMNS, r"cycle 1 -> 2 -> 3 -> 1"),
    ([("x", 1, "1", "entity - whole (a)", "a?")], COLUMNS, r"cycle 1 -> 1"),
    ([("x", 1, "0", "entity - whole (a)", "a?"), ("x", 1, "0", "entity - whole (b)", "b?")], COLUMNS,
     r"proposition ids \[1\] more than once"),
    ([("x", 1, "one", "entity - whole (a)", "a?")], COLUMNS, r"must be integers"),
    ([("x", 0, "0", "entity - whole (a)", "a?")], COLUMNS, r"proposition_id must be >= 1"),
])
def test_loader_errors(tmp_path, rows, columns, message):
    with pytest.raises(ValueError, match=message):
        load_dpg_questions(write_csv(tmp_path / "bad.csv", rows, columns))


def test_loader_short_row(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text(",".join(COLUMNS) + "\nx,prompt,,1,0\n")
    with pytest.raises(ValueError, match="fewer fields than the header"):
        load_dpg_questions(path)


def test_loader_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="TencentQQGYLab/ELLA"):
        load_dpg_questions(tmp_path / "nope.csv")


def test_mplug_without_modelscope_names_the_package_and_alternative(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # makes `import modelscope...` fail
    with pytest.raises(ImportError, match=r"modelscope.*TransformersVQA"):
        MPlugVQA()


def _tiny_tokenizer(tmp_path):
    from transformers import BertTokenizer

    (tmp_path / "vocab.txt").write_text("\n".join(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "yes", "no", "is", "there", "a", "cat", "red", "?"]))
    return BertTokenizer(str(tmp_path / "vocab.txt"), bos_token="[DEC]")


QUESTIONS = ["is there a cat?", "is there a red cat?", "cat?", "a cat is red?"]
IMAGES = [Image.new("RGB", (40, 40), (60 * i, 255 - 80 * i, 30 * i)) for i in range(4)]


def test_transformers_vqa_classifier_matches_one_by_one(tmp_path):
    from transformers import ViltConfig, ViltForQuestionAnswering, ViltImageProcessor, ViltProcessor

    processor = ViltProcessor(ViltImageProcessor(size={"shortest_edge": 32}, size_divisor=32), _tiny_tokenizer(tmp_path))
    labels = {0: "yes", 1: "no", 2: " Two ", 3: "RED"}
    config = ViltConfig(vocab_size=14, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, image_size=32, patch_size=16, max_position_embeddings=64,
                        id2label=labels, label2id={v: k for k, v in labels.items()}, initializer_range=2.0)
    torch.manual_seed(0)  # a large init so that the random classifier's answers differ between inputs
    model = ViltForQuestionAnswering(config).eval()
    vqa = TransformersVQA("tiny-vilt", device="cpu", model=model, processor=processor)
    with torch.no_grad():
        one_by_one = [labels[model(**processor(images=[image], text=[q], return_tensors="pt")).logits.argmax().item()]
                      for image, q in zip(IMAGES, QUESTIONS)]
    assert len(set(one_by_one)) > 1
    assert vqa.answer(IMAGES, QUESTIONS) == [label.strip().lower() for label in one_by_one]
    assert vqa.name == "transformers:tiny-vilt"


def test_transformers_vqa_generative_matches_one_by_one(tmp_path):
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), _tiny_tokenizer(tmp_path))
    config = BlipConfig(
        text_config=dict(vocab_size=14, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, bos_token_id=5, pad_token_id=0, sep_token_id=3,
                         max_position_embeddings=64, encoder_hidden_size=32),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                           image_size=32, patch_size=16), projection_dim=32, initializer_range=1.0)
    torch.manual_seed(1)
    model = BlipForQuestionAnswering(config).eval()
    vqa = TransformersVQA("tiny-blip", device="cpu", max_new_tokens=3, model=model, processor=processor)
    one_by_one = [processor.decode(model.generate(**processor(images=[image], text=[q], return_tensors="pt"),
                                                  max_new_tokens=3)[0], skip_special_tokens=True)
                  for image, q in zip(IMAGES, QUESTIONS)]
    assert all(answer and "[DEC]" not in answer for answer in one_by_one)
    assert vqa.answer(IMAGES, QUESTIONS) == one_by_one


def test_loader_reads_utf8_with_a_byte_order_mark(tmp_path):
    """The release's CSV holds non-ASCII prompts; a BOM (as spreadsheet exports write) must not hide `item_id`."""
    rows = [("crème", 1, "0", "entity - whole (café)", "Is there a café?"), *ROWS]
    path = write_csv(tmp_path / "dpg.csv", rows, encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    questions = load_dpg_questions(path)
    assert list(questions) == ["crème", "alpha", "beta"]
    assert questions["crème"][0].question == "Is there a café?" and questions["crème"][0].detail == "entity - whole"
