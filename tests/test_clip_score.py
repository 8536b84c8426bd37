"""CLIP score with a tiny random CLIP saved as a state dict (no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lineareval.metrics.clip_score import clip_score, load_clip


def test_clip_score_equals_the_definition(tiny_clip_file):
    import clip

    model, preprocess = load_clip(str(tiny_clip_file))
    images = np.random.default_rng(0).integers(0, 256, (5, 40, 48, 3), dtype=np.uint8)
    captions = ["a red apple", "a cat", "two dogs", "a house", "the sea"]
    score = clip_score(images, captions, model, preprocess, batch_size=2)
    from PIL import Image

    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.fromarray(image)) for image in images])
        a, b = model.encode_image(pixels), model.encode_text(clip.tokenize(captions))
        expected = 100 * torch.nn.functional.cosine_similarity(a, b).clamp(min=0).mean()
    assert score == pytest.approx(float(expected), rel=1e-5)
    assert 0 < score <= 100  # not all pairs clamped to 0, so the comparison is not vacuous


def test_unknown_clip_name_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not a file"):
        load_clip("no-such-clip")
