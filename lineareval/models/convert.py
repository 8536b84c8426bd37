"""One-off converters for official files that lineareval will not read as they are.

    python -m lineareval.models.convert convert-vqgan vqgan.ckpt vqgan.safetensors

Meta's Chameleon `vqgan.ckpt` is a PyTorch Lightning checkpoint: next to `state_dict` it may pickle
callbacks, optimizer and scheduler states and hyper-parameters as arbitrary classes, which
`torch.load(weights_only=True)` refuses (and plain `torch.load`, as the official code uses, would
import and run). This converter reads it with `RestrictedUnpickler`: tensors and plain containers are
rebuilt from an explicit allow-list, and every other global becomes an inert stub class that records
its name and ignores its arguments and state. No module named in the file is imported and no pickled
callable is called, so `__reduce__` payloads (`os.system`, ...) never run. The tensors under
`state_dict` are written to a safetensors file, which `model.chameleon_dir` then prefers.
"""

from __future__ import annotations

import argparse
import collections
import logging
import pickle
import sys
import types
from collections.abc import Mapping
from pathlib import Path

import torch

from lineareval.models.checkpoint import CheckpointError, sniff_format

logger = logging.getLogger(__name__)

# The globals a torch checkpoint needs to rebuild tensors and containers; storages are resolved by
# torch's own unpickler wrapper before this list is consulted.
ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    **{("torch", name): getattr(torch, name) for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)},
}


class InertStub:
    """Stands in for a class the allow-list does not hold: accepts any arguments, state and items, does nothing."""

    qualified_name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass

    def append(self, item) -> None:
        pass

    def extend(self, items) -> None:
        pass

    def __repr__(self) -> str:
        return f"<inert stub for {self.qualified_name}>"


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only `ALLOWED_GLOBALS`; every other global is an `InertStub` subclass.

    `stubbed` collects the names replaced, so the caller can say what was left out; torch builds the
    unpickler itself, so each load gets a subclass with its own set (`restricted_pickle_module`).
    """

    stubbed: set[str] = set()

    def find_class(self, module: str, name: str):
        found = ALLOWED_GLOBALS.get((module, name))
        if found is not None:
            return found
        qualified = f"{module}.{name}"
        self.stubbed.add(qualified)
        return type(name, (InertStub,), {"qualified_name": qualified, "__module__": "lineareval.inert"})


def restricted_pickle_module(stubbed: set[str]) -> types.ModuleType:
    """What `torch.load(pickle_module=...)` uses: `Unpickler` and `load` (legacy files read their header with
    it), both restricted, recording stubbed names in `stubbed`."""
    unpickler = type("Unpickler", (RestrictedUnpickler,), {"stubbed": stubbed})
    module = types.ModuleType("lineareval_restricted_pickle")
    module.Unpickler = unpickler
    module.load = lambda file, **kwargs: unpickler(file, **kwargs).load()
    return module


def read_restricted(path: str | Path) -> tuple[object, list[str]]:
    """Load a torch checkpoint of untrusted origin; returns the object and the sorted names that were stubbed."""
    path = Path(path)
    if sniff_format(path) != "torch":
        raise CheckpointError(f"{path} is already a safetensors file; there is nothing to convert.")
    stubbed: set[str] = set()
    try:
        # weights_only=False only lets torch use our pickle module; RestrictedUnpickler decides every global.
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle_module(stubbed))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError) as error:
        raise CheckpointError(f"Cannot read {path} as a torch checkpoint: {type(error).__name__}: {error}") from error
    return obj, sorted(stubbed)


def convert_vqgan(source: str | Path, target: str | Path) -> Path:
    """Write the tensors under `state_dict` of a Lightning `vqgan.ckpt` (or a raw state dict) to safetensors."""
    from safetensors.torch import save_file

    source, target = Path(source), Path(target)
    obj, stubbed = read_restricted(source)
    if stubbed:
        logger.info("Replaced %d classes of %s by inert stubs (never imported or run): %s", len(stubbed), source,
                    ", ".join(stubbed))
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source} holds no state_dict (top level: {type(obj).__name__}); is it a VQGAN "
                              "checkpoint?")
    tensors = {key: value.detach().contiguous().clone() for key, value in state.items()
               if isinstance(key, str) and isinstance(value, torch.Tensor)}
    skipped = sorted(str(key) for key in state if str(key) not in tensors)
    if skipped:
        logger.warning("%s: state_dict entries that are not tensors were left out: %s", source, ", ".join(skipped))
    if not tensors:
        raise CheckpointError(f"{source}: its state_dict holds no tensors.")
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata={"converted_from": source.name})
    logger.info("Wrote %d tensors from %s to %s", len(tensors), source, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lineareval.models.convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    vqgan = commands.add_parser("convert-vqgan", help="Chameleon vqgan.ckpt (Lightning) -> vqgan.safetensors")
    vqgan.add_argument("source", type=Path, help="the Lightning checkpoint, e.g. tokenizer/vqgan.ckpt")
    vqgan.add_argument("target", type=Path, help="the safetensors file to write, e.g. tokenizer/vqgan.safetensors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        convert_vqgan(args.source, args.target)
    except (CheckpointError, FileNotFoundError) as error:
        logger.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
