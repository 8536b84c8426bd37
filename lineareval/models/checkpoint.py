"""Safe loading of official checkpoints: read a file, find its state dict, load it strictly.

Checkpoints come from the internet, so pickles are read with `torch.load(weights_only=True)` and an
allow-list holding only `argparse.Namespace` (LlamaGen stores its training args next to the
weights).
Tensors are returned as stored; casting to a compute dtype is the caller's job.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# Plain types official training scripts save next to the weights. Nothing else is ever unpickled.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

# Official layouts, in the order they are tried: LlamaGen ("model"), DeepSpeed ("module"), generic
# ("state_dict"). A raw state dict (LlamaGen XXL/3B, saved with FSDP) is recognised by its values.
STATE_KEYS: tuple[str, ...] = ("model", "module", "state_dict")

# Files a directory given in place of a checkpoint may hold, to suggest in the error.
CHECKPOINT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")

_MAX_LISTED = 10
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read safely or does not fit the model."""


class ForeignObjectsError(CheckpointError):
    """A torch pickle that holds objects outside the allow-list (refused, never run)."""


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a safetensors or torch checkpoint file and return its model state dict on CPU.

    The format is read from the file's first bytes, not its name, so a safetensors file saved as
    `.pt`/`.ckpt` loads too. Anything else (an empty file, a folder, an HTML page or Git LFS pointer in
    place of the weights, a truncated download) is a `CheckpointError` naming the file and the problem.
    """
    path = Path(path)
    if sniff_format(path) == "safetensors":
        return _load_safetensors(path)
    obj = _torch_load(path)
    state = extract_model_state(obj, path)
    logger.info("Read %d tensors from %s", len(state), path)
    return state


def sniff_format(path: Path) -> str:
    """"safetensors" or "torch" from the file's first bytes; a clear error for anything else."""
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    if path.is_dir():
        inside = sorted(str(item) for item in path.iterdir() if item.suffix in CHECKPOINT_SUFFIXES)
        raise CheckpointError(f"{path} is a directory, not a checkpoint file; point at a file inside it"
                              + (f" ({_listing(inside)})." if inside else " (it holds no checkpoint file)."))
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy was interrupted. Delete it and "
                              "download it again.")
    with path.open("rb") as handle:
        head = handle.read(64)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch's zip format, or a legacy pickle
        return "torch"
    header_length = int.from_bytes(head[:8], "little")
    if len(head) > 8 and head[8:9] == b"{" and 8 + header_length <= size:
        return "safetensors"
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(f"{path} is a Git LFS pointer ({size} bytes), not the weights: run `git lfs pull` in "
                              "its repository, or download the file itself.")
    raise CheckpointError(f"{path} is not a torch checkpoint (zip or pickle) nor a safetensors file: it starts with "
                          f"{head[:16]!r} ({size} bytes). Is it an error page saved in place of the download? "
                          "Download it again.")


def _torch_load(path: Path) -> object:
    """`torch.load(weights_only=True)` with the allow-list; torch's failures become CheckpointErrors."""
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _torch_reason(error)
        blocked = BLOCKED_GLOBAL.search(reason)
        if blocked:  # a call of a blocked module's function (os.system, ...): code the pickle would run
            raise ForeignObjectsError(
                f"Refusing to load {path}: it holds code, a pickled call of {blocked[1]} that loading it would "
                "run (outside the allow-list of plain types; nothing was run). If you trust its source, extract "
                "its tensors without running anything: `python -m lineareval.models.convert convert-vqgan "
                f"{path} {path.with_suffix('.safetensors')}` (it reads the tensors under state_dict); otherwise "
                "get the official weights file."
            ) from error
        if "Unsupported global" not in reason:
            raise CheckpointError(f"{path} is a truncated or corrupt torch pickle: torch said: {reason}. "
                                  "Download it again.") from error
        allowed = ", ".join(f"{cls.__module__}.{cls.__qualname__}" for cls in SAFE_GLOBALS)
        raise ForeignObjectsError(
            f"Refusing to load {path}: it contains objects outside the allow-list of plain types "
            f"(tensors, containers, numbers, strings, {allowed}). torch said: {reason}\n"
            "Get the official weights file, or convert this one to .safetensors in a trusted "
            "environment; lineareval never unpickles arbitrary objects."
        ) from error
    except (RuntimeError, EOFError, ValueError, KeyError, OSError) as error:
        # e.g. "PytorchStreamReader failed reading zip archive" for a download cut short
        raise CheckpointError(f"{path} is a truncated or corrupt torch checkpoint: torch said: "
                              f"{type(error).__name__}: {_ANSI.sub('', str(error)).strip()}. Download it again."
                              ) from error


def extract_model_state(obj: object, path: str | Path) -> dict[str, Tensor]:
    """Return the model state dict of a loaded checkpoint in any official layout.

    Accepts `{"model": sd}` (LlamaGen), `{"module": sd}` (DeepSpeed), `{"state_dict": sd}` and a raw
    state dict whose values are all tensors (FSDP files of LlamaGen XXL/3B).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"Unknown checkpoint layout in {path}: expected a dict, got {type(obj).__name__}."
        )
    for key in STATE_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            return _as_state_dict(obj[key], path, where=f'["{key}"]')
    if obj and all(isinstance(value, Tensor) for value in obj.values()):
        return _as_state_dict(obj, path, where="")
    raise CheckpointError(
        f"Unknown checkpoint layout in {path}: top-level keys {_listing(map(repr, obj))}. "
        f"Expected one of {list(STATE_KEYS)} holding the state dict, "
        "or a raw state dict of tensors."
    )


def load_into(
    module: nn.Module,
    state: Mapping[str, Tensor],
    *,
    source: str,
    ignore: tuple[str, ...] = ("freqs_cis",),
) -> None:
    """Strictly load `state` into `module`, reporting every mismatch at once.

    Keys named in `ignore` (exactly, or as the last dotted component) are neither loaded nor
    required: old LlamaGen files carry a precomputed `freqs_cis` buffer that we rebuild ourselves.
    """
    state = {key: value for key, value in state.items() if not _ignored(key, ignore)}
    expected = {
        key: value for key, value in module.state_dict().items() if not _ignored(key, ignore)
    }
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"  {label} ({len(items)}): {_listing(items)}"
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            )
            if items
        ]
        raise CheckpointError(
            f"Checkpoint {source} does not fit {type(module).__name__}:\n"
            + "\n".join(problems)
            + "\nIs this the right model size and family? Check the model.* fields of the config."
        )
    # Our checks above cover strictness; strict=False only lets ignored module keys stay as built.
    module.load_state_dict(state, strict=False)
    logger.info("Loaded %d tensors from %s into %s", len(state), source, type(module).__name__)


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path, device="cpu")
    except SafetensorError as error:
        raise CheckpointError(f"Cannot read safetensors file {path}: {error}") from error
    logger.info("Read %d tensors from %s", len(state), path)
    return state


def _as_state_dict(state: Mapping, path: str | Path, where: str) -> dict[str, Tensor]:
    bad = [
        repr(key)
        for key, value in state.items()
        if not (isinstance(key, str) and isinstance(value, Tensor))
    ]
    if bad:
        raise CheckpointError(
            f"State dict{where} in {path} has entries that are not named tensors: {_listing(bad)}."
        )
    return dict(state)


def _ignored(key: str, ignore: tuple[str, ...]) -> bool:
    return key in ignore or key.rsplit(".", 1)[-1] in ignore


def _listing(items: Iterable[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_LISTED])
    rest = len(items) - _MAX_LISTED
    return f"{shown}, ... and {rest} more" if rest > 0 else shown


# torch >= 2.6 on a global of a module it blocks outright (os, subprocess, ...): "Trying to load unsupported
# GLOBAL posix.system whose module posix is blocked."
BLOCKED_GLOBAL = re.compile(r"unsupported GLOBAL (\S+) whose module \S+ is blocked")


def _torch_reason(error: Exception) -> str:
    """torch's reason for refusing a pickle, without its advice to load unsafely.

    The reason follows "WeightsUnpickler error:", on the same line ("Unsupported global: ...") or on
    the next ones ("Unsupported operand 207"); it ends before "Check the documentation" and before the
    "Please use `torch.serialization.add_safe_globals`" advice.
    """
    message = _ANSI.sub("", str(error))
    _, found, reason = message.partition("WeightsUnpickler error:")
    if not found:
        return message.strip()
    reason = reason.split("Check the documentation")[0].split(" Please use")[0]
    return " ".join(reason.split())
