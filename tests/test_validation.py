"""What a user passes to the API or run.py is checked before anything is sampled: a clear ValueError naming the
value, never a silently different sample (the null class, a wrapped seed, a truncated label) or a late IndexError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import lineareval


@pytest.fixture(scope="module")
def pipe():
    """The tiny random class-conditional model (10 classes: label 10 is guidance's null class)."""
    return lineareval.load("llamagen_tiny", "num_samples=1", weights="random", device="cpu", decode_images=False)


@pytest.mark.parametrize("labels, message", [
    ([10], r"labels must be in \[0, 10\).*null class.*\[10\]"),  # the null class: unconditional images before
    ([5000], r"labels must be in \[0, 10\).*\[5000\]"),
    ([-1], r"labels must be in \[0, 10\).*\[-1\]"),
    ([1.7], "labels must be integers.*truncated"),
    ([[1, 2]], "1-D.*shape \\(1, 2\\)"),
    ([], "labels is empty"),
    (np.array([True]), "labels must be integers"),
])
def test_bad_labels_are_refused_with_the_accepted_range(pipe, labels, message):
    assert pipe.generator.num_classes == 10
    with pytest.raises(ValueError, match=message):
        pipe.generate(labels=labels)


@pytest.mark.parametrize("seed", [-1, 2**32, 2**40, "abc", 1.5, True])
def test_bad_seeds_are_refused_as_run_py_refuses_them(pipe, make_config, seed):
    from lineareval.config import check_run_fields

    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        pipe.generate(labels=[1], seed=seed)
    cfg = make_config()
    cfg.seed = seed
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        check_run_fields(cfg)


@pytest.mark.parametrize("sample_ids, message", [
    ([0, 1], "sample_ids has 2 entries but there are 1"),
    ([-3], r"sample_ids must be in \[0, 2\*\*32\)"),
    ([2**32], r"sample_ids must be in \[0, 2\*\*32\)"),
    ([0.5], "sample_ids must be integers"),
])
def test_bad_sample_ids_are_refused(pipe, sample_ids, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate(labels=[1], sample_ids=sample_ids)


def test_valid_inputs_of_every_integer_kind_sample_the_same_tokens(pipe):
    import torch

    reference = pipe.generate(labels=[3, 9], seed=2**32 - 1, sample_ids=[5, 6]).tokens
    for labels in (np.array([3, 9], dtype=np.int32), torch.tensor([3, 9])):
        again = pipe.generate(labels=labels, seed=np.uint32(2**32 - 1), sample_ids=np.array([5, 6])).tokens
        assert np.array_equal(again, reference)


@pytest.mark.parametrize("overrides, message", [
    (("decoding=sjd", "decoding.max_iterations=0"), r"decoding.max_iterations must be null .* or an integer >= 1, "
                                                    r"got 0"),
    (("decoding=sjd", "decoding.max_iterations=-1"), r"decoding.max_iterations must be null .* got -1"),
    (("decoding=sjd", "decoding.max_iterations=2.5"), r"decoding.max_iterations must be null .* got 2.5"),
    (("decoding=gsd", "decoding.group_radius=-1"), r"decoding.group_radius must be an integer >= 0, got -1"),
    (("decoding=gsd", "decoding.group_probability=2"), r"decoding.group_probability must be in \(0, 1\), got 2"),
    (("decoding=gsd", "decoding.group_probability=0"), r"decoding.group_probability must be in \(0, 1\), got 0"),
    (("decoding=sjd", "decoding.window=0"), r"decoding.window must be an integer >= 1, got 0"),
    (("cache=streamingllm", "cache.sinks=-1"), r"streamingllm sinks must be an integer >= 0, got -1"),
    (("cache=streamingllm", "cache.sinks=1.5"), r"streamingllm sinks must be an integer >= 0, got 1.5"),
])
def test_nonsense_decoding_and_policy_fields_are_refused_before_the_run_folder_exists(make_config, overrides,
                                                                                      message):
    from lineareval.runner import run

    cfg = make_config(*overrides)
    with pytest.raises(ValueError, match=message):
        run(cfg)
    assert not Path(cfg.run_dir).exists()


@pytest.mark.parametrize("override, field", [
    ("prompt=a red apple", "prompt"),
    ("prompts_file=prompts.txt", "prompts_file"),
    ("images_per_prompt=4", "images_per_prompt"),
])
def test_text_fields_on_a_class_conditional_model_are_refused(make_config, override, field):
    from lineareval.runner import run

    cfg = make_config("weights=random", override)
    with pytest.raises(ValueError, match=rf"{field}=.* model llamagen_tiny is class-conditional.*num_samples"):
        run(cfg)
    assert not (Path(cfg.run_dir) / "config.yaml").exists()


def test_speculative_decoding_with_too_few_iterations_is_refused_before_sampling(make_config, monkeypatch):
    """decoding.max_iterations=1 could never finish an image (each iteration commits at least one of N tokens)."""
    import lineareval.runner as runner
    from lineareval.runner import run

    calls = []
    monkeypatch.setattr(runner, "timed_generation", lambda *args: calls.append(args))
    cfg = make_config("weights=random", "decoding=sjd", "decoding.max_iterations=1")
    with pytest.raises(ValueError, match=r"decoding.max_iterations=1 is below the 255 iterations .*max_iterations=null"):
        run(cfg)
    assert calls == [] and not (Path(cfg.run_dir) / "config.yaml").exists()


@pytest.mark.parametrize("suffix", [".txt", ".json", ".jsonl"])
def test_a_binary_prompts_file_is_named_in_the_error(tmp_path, suffix):
    from lineareval.benchmarks.samples import load_prompts

    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    with pytest.raises(ValueError, match=rf"prompts_file {path} is not UTF-8 text .*byte 0x[0-9a-f]{{2}} at "
                                         r"offset \d+"):
        load_prompts(None, str(path))


def test_a_malformed_json_prompts_file_is_named_in_the_error(tmp_path):
    from lineareval.benchmarks.samples import load_prompts

    path = tmp_path / "prompts.json"
    path.write_text('["a red apple", ')
    with pytest.raises(ValueError, match=rf"prompts_file {path} is not valid JSON"):
        load_prompts(None, str(path))


@pytest.mark.parametrize("value", [-1, 2.5, "many"])
def test_a_bad_grid_images_fails_before_sampling_not_after(make_config, monkeypatch, value):
    import lineareval.runner as runner
    from lineareval.runner import run

    calls = []
    monkeypatch.setattr(runner, "timed_generation", lambda *args: calls.append(args))
    cfg = make_config("weights=random", f"grid_images={value}")
    with pytest.raises(ValueError, match=r"grid_images must be an integer >= 0 \(0: no samples.png\)"):
        run(cfg)
    assert calls == [] and not Path(cfg.run_dir).exists()


def test_grid_images_0_writes_no_grid(make_config):
    from lineareval.runner import run

    cfg = make_config("weights=random", "num_samples=2", "batch_size=2", "model.image_size=128", "grid_images=0")
    run(cfg)
    assert (Path(cfg.run_dir) / "samples.npz").exists() and not (Path(cfg.run_dir) / "samples.png").exists()
