"""Random weights for `weights=random` speed benchmarks (never a fallback for missing checkpoints)."""

from __future__ import annotations

import torch
import torch.nn as nn


def initialise_random(modules: list[nn.Module], seed: int, device: torch.device | str = "cpu") -> None:
    """Official-style init with one seeded generator: matrices normal(0, 0.02), norm gains 1, other vectors 0.

    Output layers are not zeroed (as LlamaGen's training init does), so logits exercise sampling.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    for module in modules:
        for name, parameter in module.named_parameters():
            if parameter.dim() > 1:
                parameter.data.normal_(0.0, 0.02, generator=generator)
            else:
                parameter.data.fill_(1.0 if "norm" in name else 0.0)
