"""The demo data set: square crops of ten public-domain photographs shipped inside scikit-image.

Class `c` is photograph `PHOTOS[c]`. Each photograph is first resized (antialiased) so its shorter
side is `4 * image_size`, so every class is seen at a similar scale. Its bottom-right quadrant is
held out: training crops never overlap it, and the reference crops that FID compares samples with
come only from it. A crop has a random side in `[image_size, 2 * image_size]` (a random zoom), a
random position and a random horizontal flip, and is resized to `image_size` (bilinear, antialiased).

Everything is a function of the seed: the same call returns the same bytes on any machine.
Provenance and licences of the photographs: `lineareval/demo/README.md`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# skimage.data loaders whose files ship inside the scikit-image wheel (no download); all are CC0 or
# public domain (see README.md). Grey-scale textures are repeated into three channels.
PHOTOS = ("astronaut", "brick", "chelsea", "coffee", "grass", "gravel", "hubble_deep_field",
          "immunohistochemistry", "retina", "rocket")
SPLITS = ("train", "heldout")
MAX_ZOOM = 2  # crop sides range over [image_size, MAX_ZOOM * image_size]
DATA_VERSION = 1  # bump on any change that alters the crops (cached reference batches are keyed by it)


@dataclass(frozen=True)
class Box:
    """A crop in photo pixels: rows [top, top + side), columns [left, left + side)."""

    top: int
    left: int
    side: int

    def overlaps(self, top: int, left: int) -> bool:
        """Whether the box reaches into the quadrant of rows >= top and columns >= left."""
        return self.top + self.side > top and self.left + self.side > left


@lru_cache(maxsize=4)
def load_photos(short_side: int) -> tuple[np.ndarray, ...]:
    """The photographs as uint8 (H, W, 3), each resized so that min(H, W) == short_side."""
    import skimage.data

    photos = []
    for name in PHOTOS:
        pixels = getattr(skimage.data, name)()
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[..., None], 3, axis=-1)
        image = Image.fromarray(np.ascontiguousarray(pixels[..., :3]))
        scale = short_side / min(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        photos.append(np.asarray(image.resize(size, Image.Resampling.LANCZOS)))
    return tuple(photos)


def heldout_corner(photo: np.ndarray) -> tuple[int, int]:
    """(top, left) of the held-out bottom-right quadrant."""
    return photo.shape[0] // 2, photo.shape[1] // 2


def _draw_box(photo: np.ndarray, split: str, side: int, rng: np.random.Generator) -> Box:
    height, width = photo.shape[:2]
    top, left = heldout_corner(photo)
    if split == "heldout":
        return Box(int(rng.integers(top, height - side + 1)), int(rng.integers(left, width - side + 1)), side)
    while True:  # rejection: about a third of uniform positions touch the quadrant
        box = Box(int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1)), side)
        if not box.overlaps(top, left):
            return box


def crop_boxes(count: int, image_size: int, split: str, seed: int) -> tuple[list[Box], np.ndarray, np.ndarray]:
    """Where crop i comes from: boxes, labels (count,) int64 (i % classes) and flips (count,) bool."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    photos = load_photos(4 * image_size)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    labels = np.arange(count) % len(PHOTOS)
    sides = rng.integers(image_size, MAX_ZOOM * image_size + 1, size=count)
    flips = rng.random(count) < 0.5
    boxes = [_draw_box(photos[label], split, int(side), rng) for label, side in zip(labels, sides)]
    return boxes, labels.astype(np.int64), flips


def make_crops(count: int, image_size: int, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` crops, classes in turn: images uint8 (count, S, S, 3) and labels int64 (count,)."""
    photos = load_photos(4 * image_size)
    boxes, labels, flips = crop_boxes(count, image_size, split, seed)
    images = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    for index, (box, label, flip) in enumerate(zip(boxes, labels, flips)):
        patch = photos[label][box.top:box.top + box.side, box.left:box.left + box.side]
        pixels = torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1)[None].float()  # (1, 3, s, s)
        if box.side != image_size:
            pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", antialias=True,
                                   align_corners=False)
        pixels = pixels.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
        images[index] = pixels[:, ::-1] if flip else pixels
    return images, labels


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], the tokenizer's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
