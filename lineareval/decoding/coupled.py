"""Coupled drafts: MC-SJD, speculative Jacobi decoding whose redrawn drafts stay put when p barely moved.

MC-SJD (So, Kook, Jang and Park, "MC-SJD: Maximal Coupling Speculative Jacobi Decoding for Autoregressive
Visual Generation Acceleration", arXiv 2510.24211, https://arxiv.org/abs/2510.24211): SJD
(lineareval/decoding/speculative.py) redraws every draft after an iteration's first rejection from the
new distribution p'_j, independently of the old draft x_j ~ q_j, so a draft whose distribution hardly
changed still changes token with probability 1 - sum_x q_j(x) p'_j(x), and every later draft's context
with it. MC-SJD draws the new draft from a coupling of (q_j, p'_j) instead:

- `coupling: maximal` (the paper's method): keep x_j with probability min(1, p'_j(x_j) / q_j(x_j)), else
  draw from the normalised residual max(0, p'_j - q_j). The new draft equals the old one with
  probability sum_x min(q_j(x), p'_j(x)) = 1 - TV(q_j, p'_j), the most any coupling allows. A point-mass
  proposal (a forced, `init=above` or SJD++-reused draft) keeps x_j with probability p'_j(x_j), else draws
  from p'_j without x_j;
- `coupling: gumbel`: every draft of a (sample, position) is argmax(log d + g_j) of its distribution d
  (the uniform initialisation, then each p'_j) with the SAME Gumbel noise g_j at every iteration, so
  the draft changes only where the argmax does.

Why the sampling distribution stays exactly sequential decoding's: SJD's rejection sampling is exact if,
when position j is verified, its draft has law q_j (the recorded proposal) given everything that decided
the committed prefix. The old draft x_j influenced nothing at positions <= j: it is fed to the model
only as context for positions > j (attention is causal), and its own acceptance test is either unused
(an earlier position was rejected) or ends position j's drafting (it is committed). So given q_j, p'_j
and everything at positions < j, x_j still has law q_j, and drawing the new draft from a coupling whose
second marginal is p'_j gives a draft of law p'_j given all of that: maximal coupling's marginal is
min(q_j, p'_j) + (1 - sum min(q_j, p'_j)) * max(0, p'_j - q_j) / sum max(0, p'_j - q_j) = p'_j, and
Gumbel-max with noise g_j that nothing at positions <= j has seen is an exact sample of p'_j. The new
draft is recorded with proposal p'_j, exactly as in SJD, so the next verification is SJD's. The drafts a
window feeds past an eviction it may not verify past (lineareval/decoding/speculative.py) are redrawn the
same way: the old draft was fed only as context for later positions and its acceptance test never ran.

Randomness: the keep/residual draws of maximal coupling are keyed by (seed, sample id, position,
iteration, purpose) in streams of their own (the iteration with bit 31 set: SJD's streams never reach
it); Gumbel coupling's noise is keyed by (seed, sample id, position) WITHOUT the iteration (one stream,
the iteration key all ones). So an image still depends only on (seed, sample id).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lineareval.decoding.session import DecodeSession
from lineareval.decoding.speculative import ACCEPT, DRAFT, INIT, RESIDUAL, JacobiState, Speculative
from lineareval.sampling import keyed_gumbel, keyed_uniform, speculative_keys

COUPLINGS = ("maximal", "gumbel")
COUPLED_STREAM = 1 << 31  # or'ed into the iteration of maximal coupling's draws: streams SJD never uses
SHARED_NOISE = 0xFFFFFFFF  # the iteration key of Gumbel coupling's noise: one stream for every iteration


@dataclass
class CoupledSpeculative(Speculative):
    """`decoding=mc_sjd`: SJD with coupled redraws (`coupling`: maximal | gumbel); see the module docstring."""

    name: str = "mc_sjd"
    coupling: str = "maximal"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.coupling not in COUPLINGS:
            raise ValueError(f"decoding.coupling must be one of {COUPLINGS}, got {self.coupling!r}")

    def state(self, session: DecodeSession) -> JacobiState:
        return CoupledJacobiState(self, session)


class CoupledJacobiState(JacobiState):
    """SJD's state whose redraws are coupled with the old drafts; counts the redraws that kept their token."""

    def __init__(self, method: CoupledSpeculative, run: DecodeSession):
        super().__init__(method, run)
        self.kept = np.zeros(len(run.sample_ids), dtype=np.int64)  # coupled redraws equal to the old draft
        self.redrawn = np.zeros(len(run.sample_ids), dtype=np.int64)

    def keys(self, positions: torch.Tensor, purpose: int, images: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Gumbel coupling: the drafts' noise (initialisation and every redraw) has no iteration in its key."""
        if self.method.coupling == "gumbel" and purpose in (INIT, DRAFT):
            seed_key, counters = speculative_keys(self.run.seed, positions, SHARED_NOISE, DRAFT)
            ids = self.run.sample_ids if images is None else self.run.sample_ids[images]
            return ids[:, None].expand_as(positions).reshape(-1), seed_key, counters.reshape(-1)
        return super().keys(positions, purpose, images)

    def coupled_keys(self, positions: torch.Tensor, purpose: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Keys of maximal coupling's own draws at positions (B, k) in this iteration (streams SJD never uses)."""
        seed_key, counters = speculative_keys(self.run.seed, positions, self.iteration | COUPLED_STREAM, purpose)
        return self.run.sample_ids[:, None].expand_as(positions).reshape(-1), seed_key, counters.reshape(-1)

    def redraws(self, p: torch.Tensor, drafts: torch.Tensor, targets: torch.Tensor, redraw: torch.Tensor
                ) -> torch.Tensor:
        """New drafts (B, k), each of law p (B, k, V) and coupled with the old draft (B, k) of proposal q; counts
        the redraws (`redraw`, (B, k)) that kept their token."""
        if self.method.coupling == "gumbel":
            fresh = self.draw(p, targets, DRAFT)  # the shared noise: coupled by construction
        else:
            fresh = self.maximal(p, drafts, targets)
        self.kept += ((fresh == drafts) & redraw).long().sum(1).cpu().numpy()
        self.redrawn += redraw.long().sum(1).cpu().numpy()
        return fresh

    def maximal(self, p: torch.Tensor, drafts: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Maximal coupling of (q, p): keep the draft with probability min(1, p(x) / q(x)), else draw from the
        normalised max(0, p - q) (a point-mass q: p without x)."""
        proposals, point = self.ring(self.proposals, targets), self.ring(self.point, targets)
        target = p.gather(-1, drafts[..., None])[..., 0]
        proposal = torch.where(point, torch.ones_like(target), proposals.gather(-1, drafts[..., None])[..., 0])
        ids, seed_key, counters = self.coupled_keys(targets, ACCEPT)
        uniform = keyed_uniform(ids, seed_key, counters, 1).view(targets.shape).to(p.device)
        keep = (uniform < (target / proposal.clamp(min=1e-30)).clamp(max=1)) & (proposal > 0)
        residual = torch.where(point[..., None], p.scatter(-1, drafts[..., None], 0.0), (p - proposals).clamp(min=0))
        residual = torch.where(residual.sum(-1, keepdim=True) <= 0, p, residual)  # p == q: the draft is kept anyway
        ids, seed_key, counters = self.coupled_keys(targets, RESIDUAL)
        noise = keyed_gumbel(ids, seed_key, counters, self.run.vocab).view(p.shape).to(p.device)
        return torch.where(keep, drafts, (residual.log() + noise).argmax(-1))

    def statistics(self) -> dict:
        """SJD's statistics and `drafts_kept`: the share of the window's redraws that kept their token."""
        redrawn = max(int(self.redrawn.sum()), 1)
        return {**super().statistics(), "drafts_kept": float(self.kept.sum() / redrawn)}
