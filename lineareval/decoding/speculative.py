"""Speculative Jacobi decoding (SJD) and its successors, composed with any cache policy.

SJD (Teng et al., "Accelerating Auto-regressive Text-to-Image Generation with Training-free Speculative
Jacobi Decoding", ICLR 2025, https://arxiv.org/abs/2410.01699): each iteration feeds an image's last
committed token and a window of draft tokens in one forward pass (a multi-token cache step, causal in
the window), so the logits p_j of every window position j come out at once. Draft x_j, drawn from q_j,
is accepted with probability min(1, p_j(x_j) / q_j(x_j)), in order; the first rejected position is
resampled from the normalised residual max(0, p_j - q_j); the accepted prefix and the resampled token
are committed (the cache keeps the keys and values of the accepted prefix and rolls the rest back),
and the later drafts are redrawn from this iteration's p_j, which becomes their q. Rejection sampling
makes every committed token an exact sample of p given the committed prefix: the sampling distribution
is sequential decoding's. p is the distribution sequential decoding samples from: guidance (both CFG
branches verify the same window), the family's forced tokens (drafted and always accepted) and allowed
tokens, temperature, top-k and top-p. With `top_k=1` this is Jacobi decoding: the sequential tokens.

Options:
- `init`: new drafts are `random` (uniform over the allowed tokens, the reference's default) or
  `above` (the token one line up, a deterministic proposal: q = a point mass, accepted with probability
  p(x); the spatial prior of the SJD paper);
- `reuse_threshold` (SJD++, Teng et al., arXiv 2512.07503, which reuses high-confidence drafts after
  verification): a draft after the first rejection whose new p is at least the threshold is kept as a
  point-mass proposal instead of being redrawn. Exact, since a kept draft is a function of the past;
- `acceptance: group` (GSD, So et al., ICCV 2025, https://arxiv.org/abs/2508.07747): accept when the
  group of tokens ranked within `group_radius` of the draft in p, with p within `group_probability` of
  p(draft), has p(group) / q(group) above the uniform draw. Faster, NOT distribution-preserving.

Cache policies: eviction happens at the same committed positions as in sequential decoding. With
`eviction: exact` (default) an iteration verifies, and so commits, nothing past an image's next
eviction point e (a line end, or for per-step policies a step, once the visual cache would exceed the
budget): the last position verified is e + 1, whose logits come from the query at e, computed before
e's commit evicts. No committed token's query has seen a token an earlier eviction removes, so every
policy keeps what sequential decoding keeps: greedy SJD gives the sequential tokens and caches.
With `draft_past_evictions` (default) the window fed may still run past e, up to what the iteration
after the eviction can verify (the next eviction after e, plus one); those drafts are not verified
this iteration: like the drafts after a rejection they are redrawn from this iteration's p (MC-SJD:
coupled with the old draft), which becomes their proposal q, and the next iteration, after the
eviction happened at commit (the chunk's uncommitted tokens are rolled back before it runs,
lineareval/cache/schedule.py), verifies them against the evicted cache. Exact for the same reason
SJD's redraws are: a draft and its proposal are functions of the past (committed tokens, earlier
drafts, this iteration's p) and of draws keyed by this iteration, the acceptance draw that judges it
next iteration is keyed by that iteration, and rejection sampling accepts a draft of law q with
probability min(1, p'/q) against whatever p' the post-eviction cache gives, so the committed token
has law p'. It costs compute, not passes: a window crossing a line end feeds up to `window` tokens
where it used to stop; per-step policies, whose next iteration verifies one token again, do not
draft past (it would only cost). `draft_past_evictions=false` stops windows at e + 1 (the earlier
behaviour). `eviction: commit` lets windows of per-step policies run past evictions: the window's
queries see the cache as the window began and evictions happen at commit, in order (the engine's
chunk semantics, lineareval/cache/schedule.py): faster, a slightly different model.

Every draw of image b (draft, acceptance, residual) is keyed by (seed, sample id, position,
iteration, purpose), and each image's window length depends only on its own state, so an image's
tokens do not depend on the batch it is in or the process count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lineareval.decoding.method import DecodingMethod
from lineareval.decoding.session import DecodeSession
from lineareval.sampling import keyed_gumbel, keyed_uniform, speculative_keys

DRAFT, ACCEPT, RESIDUAL, INIT = range(4)  # the purposes of speculative draws
INITS = ("random", "above")
ACCEPTANCES = ("exact", "group")
EVICTIONS = ("exact", "commit")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Speculative(DecodingMethod):
    """`decoding=sjd` (and `sjd_pp`, `gsd`): see the module docstring. `window`: tokens fed per iteration, at most
    as many drafts verified (the reference's 16); `max_iterations`: a bound per batch (None: N, which always
    suffices); `draft_past_evictions`: windows feed drafts past the next eviction (verified next iteration)."""

    name: str = "sjd"
    window: int = 16
    init: str = "random"
    max_iterations: int | None = None
    reuse_threshold: float | None = None
    acceptance: str = "exact"
    group_radius: int = 7
    group_probability: float = 0.15
    eviction: str = "exact"
    draft_past_evictions: bool = True

    def __post_init__(self) -> None:
        for field, value, allowed in (("init", self.init, INITS), ("acceptance", self.acceptance, ACCEPTANCES),
                                      ("eviction", self.eviction, EVICTIONS)):
            if value not in allowed:
                raise ValueError(f"decoding.{field} must be one of {allowed}, got {value!r}")
        if not _is_int(self.window) or self.window < 1:
            raise ValueError(f"decoding.window must be an integer >= 1, got {self.window!r}")
        if self.max_iterations is not None and (not _is_int(self.max_iterations) or self.max_iterations < 1):
            raise ValueError("decoding.max_iterations must be null (N, which always suffices) or an integer >= 1, "
                             f"got {self.max_iterations!r}")
        if not _is_int(self.group_radius) or self.group_radius < 0:
            raise ValueError(f"decoding.group_radius must be an integer >= 0, got {self.group_radius!r}")
        # a probability gap of 1 or more holds for every token: the group would accept anything
        if not isinstance(self.group_probability, (int, float)) or not 0 < self.group_probability < 1:
            raise ValueError(f"decoding.group_probability must be in (0, 1), got {self.group_probability!r}")
        if not isinstance(self.draft_past_evictions, bool):
            raise ValueError(f"decoding.draft_past_evictions must be true or false, got {self.draft_past_evictions!r}")
        if self.reuse_threshold is not None and not 0 < self.reuse_threshold <= 1:
            raise ValueError(f"decoding.reuse_threshold must be in (0, 1] or null, got {self.reuse_threshold}")

    @property
    def max_chunk(self) -> int:
        return self.window

    @property
    def distribution_preserving(self) -> bool:
        return self.acceptance == "exact"

    def describe(self) -> dict:
        return dict(vars(self))

    def run(self, session: DecodeSession) -> dict:
        """Sample every image's tokens into `session.tokens`, iteration by iteration; returns the statistics."""
        session.tokens[:, 0] = session.sample(0)
        state = self.state(session)
        limit = self.max_iterations or session.num_visual
        while state.active.any():
            if state.iteration >= limit:
                raise RuntimeError(f"speculative decoding did not finish in {limit} iterations (decoding."
                                   "max_iterations): every iteration commits at least one token per image")
            state.step()
        return state.statistics()

    def state(self, session: DecodeSession) -> JacobiState:
        """The batch's Jacobi state (a subclass may redraw drafts differently: lineareval/decoding/coupled.py)."""
        return JacobiState(self, session)


class JacobiState:
    """One batch's speculative decoding: each image's committed count, its drafts and their proposals.

    Drafts and proposals live in a ring over positions (`window` slots: the live positions of an image
    are [committed, committed + window)). A proposal is a distribution (V,) or a point mass (`point`).
    """

    def __init__(self, method: Speculative, run: DecodeSession):
        self.method, self.run = method, run
        batch, device = len(run.sample_ids), run.tokens.device
        self.committed = np.ones(batch, dtype=np.int64)  # tokens 0 .. committed-1 are final
        self.drafted = np.ones(batch, dtype=np.int64)  # positions below this have a draft (or are committed)
        self.drafts = torch.zeros(batch, method.window, dtype=torch.long, device=device)
        self.proposals = torch.zeros(batch, method.window, run.vocab, device=device)
        self.point = torch.zeros(batch, method.window, dtype=torch.bool, device=device)
        self.iteration = 0
        self.finished_at = np.zeros(batch, dtype=np.int64)
        self.rejections = np.zeros(batch, dtype=np.int64)  # drafts rejected (each replaced by a residual draw)
        self.fed = np.zeros(batch, dtype=np.int64)  # tokens fed to the model over the iterations (own windows)
        allowed = run.allowed()
        self.uniform = allowed.float() / allowed.sum()
        self.forced = torch.tensor([-1 if run.forced(index) is None else run.forced(index)
                                    for index in range(run.num_visual)], device=device)

    @property
    def active(self) -> np.ndarray:
        return self.committed < self.run.num_visual

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Each image's drafts verified this iteration and drafts fed (B,) (0 once finished): verified up to
        the next eviction e plus one; fed up to the eviction after e plus one (what the next iteration can
        verify), when `draft_past_evictions` and that eviction is more than one step later, else as many
        as verified. Each depends on the image's own state alone."""
        run, method = self.run, self.method
        exact = method.eviction == "exact"
        verified = np.minimum(method.window, run.num_visual - self.committed)
        fed = verified.copy()
        for image in np.flatnonzero(self.active):
            committed, room = int(self.committed[image]), int(verified[image])
            end = run.next_eviction(committed - 1, exact)
            verified[image] = max(1, min(room, end - committed + 2))
            following = run.next_eviction(end + 1, exact) if end + 1 < run.num_visual else run.num_visual
            past = method.draft_past_evictions and following > end + 1
            fed[image] = max(int(verified[image]), min(room, following - committed + 2)) if past else verified[image]
        return np.where(self.active, verified, 0), np.where(self.active, fed, 0)

    def step(self) -> None:
        run = self.run
        lengths, fed = self.lengths()
        length = int(fed.max())
        self.fill_drafts(fed)
        starts = np.minimum(self.committed, run.num_visual) - 1
        device = run.tokens.device
        positions = torch.from_numpy(starts).to(device)[:, None] + torch.arange(length, device=device)  # fed
        targets = (positions + 1).clamp(max=run.num_visual - 1)  # the positions verified
        drafts = self.ring(self.drafts, targets)  # (B, k)
        chunk = torch.cat([run.tokens.gather(1, positions[:, :1]), drafts[:, :-1]], dim=1)
        p = run.distributions(chunk, positions.clamp(max=run.num_visual - 1), starts)  # (B, k, V)
        columns = torch.arange(length, device=device)
        valid = columns < torch.from_numpy(lengths).to(device)[:, None]  # verified
        drafting = columns < torch.from_numpy(fed).to(device)[:, None]  # this image's own window (fed)
        accepted = self.verify(p, drafts, targets, valid)  # (B,) leading accepts
        run.commit(np.where(self.active, 1 + np.minimum(accepted, lengths - 1), 0))  # x_{c-1} and accepted drafts
        rejected = torch.from_numpy(accepted < lengths).to(device)
        at = torch.from_numpy(np.minimum(accepted, length - 1)).to(device)[:, None]
        resampled = self.residual(p.gather(1, at[..., None].expand(-1, -1, run.vocab))[:, 0], targets.gather(1, at)[:, 0],
                                  drafts.gather(1, at)[:, 0])
        first_new = torch.from_numpy(accepted).to(device) + rejected.long()  # the first position not committed
        self.refresh(p, drafts, targets, first_new, drafting)
        self.fed += fed
        for image in np.flatnonzero(self.active):
            first, take = int(self.committed[image]), int(accepted[image])
            run.tokens[image, first: first + take] = drafts[image, :take]
            if bool(rejected[image]):
                run.tokens[image, first + take] = resampled[image]
                take += 1
                self.rejections[image] += 1
            self.committed[image] += take
            if self.committed[image] >= run.num_visual:
                self.finished_at[image] = self.iteration + 1
        self.iteration += 1

    def ring(self, buffer: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`buffer` (B, window, ...) at absolute positions (B, k)."""
        index = positions % self.method.window
        if buffer.dim() == 2:
            return buffer.gather(1, index)
        return buffer.gather(1, index[..., None].expand(-1, -1, buffer.shape[-1]))

    def keys(self, positions: torch.Tensor, purpose: int, images: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Sample ids, seed key and counter keys of the draws at positions (R, k) of images (R,) (default: every
        image in order), flattened (R * k,)."""
        seed_key, counters = speculative_keys(self.run.seed, positions, self.iteration, purpose)
        ids = self.run.sample_ids if images is None else self.run.sample_ids[images]
        return ids[:, None].expand_as(positions).reshape(-1), seed_key, counters.reshape(-1)

    def draw(self, distribution: torch.Tensor, positions: torch.Tensor, purpose: int,
             images: torch.Tensor | None = None) -> torch.Tensor:
        """A keyed sample of each distribution (R, k, V) (zeros excluded) at positions (R, k) -> (R, k)."""
        ids, seed_key, counters = self.keys(positions, purpose, images)
        noise = keyed_gumbel(ids, seed_key, counters, self.run.vocab).view(distribution.shape)
        return (distribution.log() + noise.to(distribution.device)).argmax(-1)

    def fill_drafts(self, fed: np.ndarray) -> None:
        """Drafts for the positions of each image's own window (fed[b] tokens) that have none yet: the forced
        token where the layout forces one (a point mass, always accepted), else the initialisation: uniform over
        the allowed tokens, or (`init=above`) the token one line up as a point mass. (A longer window of another
        image of the batch only pads this one's chunk: causal, after its own tokens, never verified.)"""
        run, method, device = self.run, self.method, self.run.tokens.device
        ends = np.where(self.active, np.minimum(self.committed + fed, run.num_visual), self.drafted)
        new = [(image, position) for image in range(len(ends)) for position in range(int(self.drafted[image]),
                                                                                      int(ends[image]))]
        self.drafted = np.maximum(self.drafted, ends)
        if not new:
            return
        images, positions = (torch.tensor(column, device=device) for column in zip(*new))
        uniform = self.draw(self.uniform.expand(len(new), 1, -1), positions[:, None], INIT, images)[:, 0]
        forced, slots = self.forced[positions], positions % method.window
        point = forced >= 0
        self.drafts[images, slots] = torch.where(point, forced, uniform)
        if method.init == "above":
            up = (positions >= run.line_len) & ~point
            row = positions - run.line_len
            committed = run.tokens[images, row.clamp(min=0)]
            pending = row >= torch.from_numpy(self.committed).to(device)[images]  # a draft: read it from the ring
            # a window longer than a line drafts chains one line apart in this call: resolve them in order
            for _ in range(-(-method.window // run.line_len)):
                above = torch.where(pending, self.drafts[images, row % method.window], committed)
                self.drafts[images, slots] = torch.where(up, above, self.drafts[images, slots])
            point = point | up
        self.point[images, slots] = point
        self.proposals[images, slots] = self.uniform

    def verify(self, p: torch.Tensor, drafts: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
        """The leading accepted drafts of each image: draft x at position j is accepted with probability
        min(1, p_j(x) / q_j(x)) (GSD: over x's group), in order, until the first rejection."""
        proposals, point = self.ring(self.proposals, targets), self.ring(self.point, targets)
        if self.method.acceptance == "group":
            group = self.group(p, drafts)
            target, proposal = (p * group).sum(-1), (proposals * group).sum(-1)
        else:
            target, proposal = p.gather(-1, drafts[..., None])[..., 0], proposals.gather(-1, drafts[..., None])[..., 0]
        proposal = torch.where(point, torch.ones_like(proposal), proposal)
        ids, seed_key, counters = self.keys(targets, ACCEPT)
        uniform = keyed_uniform(ids, seed_key, counters, 1).view(targets.shape).to(p.device)
        accept = (uniform < (target / proposal.clamp(min=1e-30)).clamp(max=1)) & (proposal > 0) & valid
        return accept.long().cumprod(dim=1).sum(dim=1).cpu().numpy()

    def group(self, p: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        """GSD's group of each draft (B, k, V) bool: the tokens ranked within `group_radius` of it in p whose p
        is within `group_probability` of p(draft)."""
        rank = p.argsort(dim=-1, descending=True).argsort(dim=-1)  # each token's rank in p
        draft_rank = rank.gather(-1, drafts[..., None])
        near = (rank - draft_rank).abs() <= self.method.group_radius
        return near & ((p - p.gather(-1, drafts[..., None])).abs() < self.method.group_probability)

    def residual(self, p: torch.Tensor, positions: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        """A keyed sample of the normalised residual max(0, p - q) at each image's first rejection (B,); a
        point-mass proposal leaves p without its draft."""
        proposals = self.ring(self.proposals, positions[:, None])[:, 0]
        point = self.ring(self.point, positions[:, None])[:, 0]
        without = p.scatter(-1, drafts[:, None], 0.0)
        residual = torch.where(point[:, None], without, (p - proposals).clamp(min=0))
        empty = residual.sum(-1, keepdim=True) <= 0  # p == q: rejection had probability zero; never reached
        residual = torch.where(empty, p, residual)
        return self.draw(residual[:, None], positions[:, None], RESIDUAL)[:, 0]

    def refresh(self, p: torch.Tensor, drafts: torch.Tensor, targets: torch.Tensor, first_new: torch.Tensor,
                drafting: torch.Tensor) -> None:
        """Redraw the drafts fed (`drafting`, (B, k)) from column first_new[b] on (after the first rejection, or
        past the verified ones) from this iteration's p (their new proposal), keeping the forced ones and those
        SJD++ reuses (p(draft) at least the threshold, as point masses)."""
        columns = torch.arange(p.shape[1], device=p.device)
        after = (columns >= first_new[:, None]) & drafting & (self.forced[targets] < 0)
        if not bool(after.any()):
            return
        reuse = torch.zeros_like(after)
        if self.method.reuse_threshold is not None:
            reuse = p.gather(-1, drafts[..., None])[..., 0] >= self.method.reuse_threshold
        redraw = after & ~reuse
        fresh = self.redraws(p, drafts, targets, redraw)
        images, columns = after.nonzero(as_tuple=True)
        slots = targets[images, columns] % self.method.window
        self.drafts[images, slots] = torch.where(redraw[images, columns], fresh[images, columns],
                                                 drafts[images, columns])
        self.point[images, slots] = reuse[images, columns]
        self.proposals[images, slots] = p[images, columns]

    def redraws(self, p: torch.Tensor, drafts: torch.Tensor, targets: torch.Tensor, redraw: torch.Tensor
                ) -> torch.Tensor:
        """New drafts (B, k) for the window's positions (those of `redraw` (B, k) are used), each a sample of this
        iteration's p (B, k, V): SJD draws them independently of the old drafts (B, k); MC-SJD couples them
        (lineareval/decoding/coupled.py)."""
        return self.draw(p, targets, DRAFT)

    def statistics(self) -> dict:
        """Forward passes per image (its iterations; the prefill is not counted), tokens committed and tokens fed
        (its own window: the model's work; a batch's chunk is as long as its longest) per pass, and the
        drafts' acceptance rate: every one of an image's N - 1 decoded tokens is a judged draft, accepted or
        rejected (and replaced by a residual draw), so the rate is 1 - rejections / (N - 1); forced tokens
        count as accepted drafts."""
        iterations, decoded = self.finished_at.astype(float), self.run.num_visual - 1
        return {"decode_passes_per_image": float(iterations.mean()),
                "tokens_per_pass": float((decoded / iterations).mean()),
                "tokens_fed_per_pass": float((self.fed / iterations).mean()),
                "draft_acceptance": float((1 - self.rejections / decoded).mean()),
                "decode_passes_batch": int(self.iteration)}
