"""CLIP score of images against their captions, with OpenAI's CLIP (`openai-clip`).

Score = 100 * mean over pairs of max(cos(image embedding, text embedding), 0), the definition of
torchmetrics' `CLIPScore` (Hessel et al. 2021 without the 2.5 rescale). Weights: a CLIP name that
`clip` knows (e.g. `ViT-B/32`; downloaded to `download_root` when online), or a local file. Official
`.pt` files are TorchScript archives: we read their state dict with `torch.jit.load` and rebuild the
model with `clip.model.build_model`; a `.safetensors` or plain state-dict file (`weights_only=True`)
works too. Python pickles are never loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def load_clip(name_or_path: str, device: torch.device | str = "cpu", download_root: str | None = None):
    """(model, preprocess) in eval mode, fp32."""
    import clip
    from clip.clip import _MODELS, _download, _transform

    path = Path(name_or_path).expanduser()
    if not path.is_file():
        if name_or_path not in _MODELS:
            raise FileNotFoundError(f"CLIP weights {name_or_path!r}: not a file and not one of {sorted(_MODELS)}")
        root = download_root or str(Path("~/.cache/clip").expanduser())
        try:
            path = Path(_download(_MODELS[name_or_path], root))
        except Exception as error:  # offline
            raise FileNotFoundError(f"CLIP weights {name_or_path} are not in {root} and could not be downloaded "
                                    f"({error}); put the .pt file there or set the CLIP path to a local file") from None
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError:
            state = torch.load(path, map_location="cpu", weights_only=True)
    model = clip.model.build_model(dict(state)).float().eval().to(device)
    return model, _transform(model.visual.input_resolution)


@torch.inference_mode()
def clip_score(images: np.ndarray, captions: list[str], model, preprocess, batch_size: int = 64,
               device: torch.device | str = "cpu") -> float:
    """images uint8 (N, H, W, 3), one caption each -> CLIP score (0..100)."""
    import clip

    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    scores = []
    for start in tqdm(range(0, len(images), batch_size), desc="CLIP score", unit="batch"):
        pixels = torch.stack([preprocess(Image.fromarray(image)) for image in images[start:start + batch_size]])
        text = clip.tokenize(captions[start:start + batch_size], truncate=True)
        image_features = model.encode_image(pixels.to(device)).float()
        text_features = model.encode_text(text.to(device)).float()
        cosine = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
        scores.append(cosine.clamp(min=0))
    return float(100 * torch.cat(scores).mean())
