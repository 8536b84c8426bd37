"""Checks of what a user passes to the Python API, with the CLI's rules, before anything is sampled.

A class label is an index into the model's class embedding, whose last row (`num_classes`) is the
null class of classifier-free guidance: label `num_classes` would silently sample unconditional images,
and a float label would be truncated. A seed is taken modulo 2**32 by the sampler's hash, so -1 or
2**40 would silently repeat another seed's samples. Each error names the value and what is accepted.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

SEED_LIMIT = 2**32  # the sampler's counter hash takes the seed modulo 2**32: larger seeds would repeat smaller ones


def is_integer(value) -> bool:
    """A Python or numpy integer, not a bool (bool is an int in Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_seed(seed, name: str = "seed") -> int:
    """`seed` as an int; a ValueError unless it is an integer in [0, 2**32), as run.py requires."""
    if not is_integer(seed) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name} must be an integer in [0, 2**32), got {seed!r}")
    return int(seed)


def _integer_array(values, what: str) -> np.ndarray:
    """A 1-D, non-empty array of integers from a list, numpy array or tensor; a ValueError naming `what`."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values)
    except ValueError as error:  # ragged nesting
        raise ValueError(f"{what} must be a 1-D list of integers, got {values!r} ({error})") from error
    if array.ndim != 1:
        raise ValueError(f"{what} must be a 1-D list of integers (one per image), got shape {array.shape}: "
                         f"{values!r}")
    if len(array) == 0:
        raise ValueError(f"{what} is empty: pass at least one (e.g. {what}=[0])")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == object and all(map(is_integer, array))):
        raise ValueError(f"{what} must be integers, got {values!r} (dtype {array.dtype}); a float would be "
                         "truncated")
    return array.astype(np.int64)


def check_labels(labels, num_classes: int, model: str) -> np.ndarray:
    """Class labels (B,) int64 in [0, num_classes); `num_classes` itself is the null (unconditional) class."""
    array = _integer_array(labels, "labels")
    bad = array[(array < 0) | (array >= num_classes)]
    if len(bad):
        raise ValueError(f"labels must be in [0, {num_classes}) for model {model} ({num_classes} classes; "
                         f"label {num_classes} is the null class of guidance), got {bad.tolist()}")
    return array


def check_prompts(prompts, model: str) -> list[str]:
    """A non-empty list of prompt strings (a lone string is refused: it would be taken letter by letter)."""
    if isinstance(prompts, str):
        raise ValueError(f"prompts must be a list of strings, got the string {prompts!r}: pass prompts=[{prompts!r}]")
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"prompts is empty: pass at least one prompt to model {model}")
    wrong = [prompt for prompt in prompts if not isinstance(prompt, str)]
    if wrong:
        raise ValueError(f"prompts must be strings, got {wrong!r}")
    return prompts


def check_sample_ids(sample_ids, count: int) -> np.ndarray:
    """Sample ids (B,) int64, one per condition, each >= 0 (default 0..B-1 when None)."""
    if sample_ids is None:
        return np.arange(count, dtype=np.int64)
    array = _integer_array(sample_ids, "sample_ids")
    if len(array) != count:
        raise ValueError(f"sample_ids has {len(array)} entries but there are {count} labels/prompts: pass one "
                         "sample id per image")
    bad = array[(array < 0) | (array >= SEED_LIMIT)]
    if len(bad):  # the hash takes ids modulo 2**32 too: id 2**32 would repeat id 0
        raise ValueError(f"sample_ids must be in [0, 2**32), got {bad.tolist()}")
    return array


def generation_inputs(generator, model: str, labels, prompts, sample_ids, seed,
                      device: torch.device) -> tuple[torch.Tensor | list[str], torch.Tensor, int]:
    """`Pipeline.generate`'s arguments checked: (labels (B,) or B prompts, sample ids (B,), seed)."""
    text = generator.conditioning == "text"
    if (prompts is None) == (labels is None) or text != (prompts is not None):
        raise ValueError(f"model {model} takes {'prompts=[...]' if text else 'labels=[...]'}")
    if text:
        conditions = check_prompts(prompts, model)
    else:
        conditions = torch.as_tensor(check_labels(labels, generator.num_classes, model), device=device)
    ids = torch.as_tensor(check_sample_ids(sample_ids, len(conditions)), device=device)
    return conditions, ids, check_seed(seed)


def check_components(cfg, *builders) -> None:
    """Check the device name and grid_images, and call `builders` (the runner passes its decoding method's and
    cache policy's: cheap dataclasses) so that their field checks (decoding.group_probability=2, cache.sinks=-1)
    fail before the run folder is created or a model loaded."""
    check_device(cfg.device)
    if not is_integer(cfg.grid_images) or cfg.grid_images < 0:  # else it fails at the merge, after all sampling
        raise ValueError(f"grid_images must be an integer >= 0 (0: no samples.png), got {cfg.grid_images!r}")
    for build in builders:
        build()


DEVICE_TYPES = ("cpu", "cuda")


def check_device(name) -> None:
    """A ValueError unless `device` is auto, cpu, cuda or cuda:N (whether CUDA is there is checked when used,
    so a finished GPU run can still be skipped on a CPU node)."""
    try:
        device = torch.device(str(name)) if name != "auto" else None
    except RuntimeError:
        device = False
    if device is False or device is not None and device.type not in DEVICE_TYPES:
        raise ValueError(f"device={name} is not a device this project runs on: use auto, cpu, cuda or cuda:N")


TEXT_FIELDS = {"prompt": None, "prompts_file": None, "images_per_prompt": 1}  # each at its default: unused


def check_conditions(cfg, generator) -> None:
    """What needs the built model: text fields on a class-conditional model (they would be ignored) and a
    speculative iteration bound that no image could meet."""
    if generator.conditioning == "class":
        given = [f"{field}={cfg.get(field)!r}" for field, default in TEXT_FIELDS.items()
                 if cfg.get(field) not in (default, "")]
        if given:
            raise ValueError(f"{', '.join(given)}: model {cfg.model.name} is class-conditional and takes no prompts; "
                             "drop them (its class labels come from seed and num_samples) or choose a text model")
    bound = cfg.decoding.get("max_iterations")
    needed = generator.layout.num_visual - 1  # the first token comes before the loop; each iteration commits >= 1
    if bound is not None and bound < needed:
        raise ValueError(f"decoding.max_iterations={bound} is below the {needed} iterations an image of model "
                         f"{cfg.model.name} can need (N - 1, each iteration commits at least one of its N = "
                         f"{needed + 1} tokens): set decoding.max_iterations=null or >= {needed}")
