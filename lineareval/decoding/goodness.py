"""Does a decoding method sample the model's distribution? A goodness-of-fit test against the model's own conditionals.

A distribution-preserving method (sequential, SJD, SJD++, MC-SJD) must give tokens whose law is the product of
the sequential conditionals p(x_t | x_<t) (under the run's cache policy: the conditionals sequential decoding
samples from). Its tokens are re-read one at a time (`TeacherForced`: the sequential decoding loop, feeding the
given tokens instead of drawing them) and each is turned into a randomized probability integral transform

    u_t = P(ranked before x_t) + v_t * p(x_t),   tokens ranked by descending p (ties by token id), v_t ~ U(0, 1),

independent of everything the sampler drew. If x_t ~ p(. | x_<t), u_t is uniform given the whole past (u_<t
included), so the N u's of an image are i.i.d. U(0, 1) and the test is exact at any sample size: no FID bias, no
second run to compare with, and it sees the joint law (every conditional given the tokens actually drawn), not
only per-position marginals. A sampler that favours likely tokens (a lower temperature, a draft kept too often)
moves u towards 0: the mean of u (se sqrt(1/12n)) and a Kolmogorov-Smirnov test against U(0, 1) find it;
`pit_summary` also gives the mean log p per token. Round-off between the sampler's chunked passes and these
one-token passes moves p by ~1e-6: far below what n ~ 1e5 tokens can resolve (se of mean u ~ 1e-3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats

from lineareval.decoding.method import Sequential
from lineareval.decoding.session import DecodeSession

PIT_SALT = 0x5EED_B17  # the PIT draws' own numpy streams, (PIT_SALT, seed, sample id): nothing a sampler uses


@dataclass
class TeacherForced(Sequential):
    """Sequential decoding's loop feeding `tokens` (B, N) instead of drawing them; records log p(x_t) and the
    randomized PIT u_t of every token (B, N) (NaN where the layout forces the token)."""

    tokens: torch.Tensor = None
    name: str = "teacher_forced"
    log_p: np.ndarray = field(default=None, init=False)
    pit: np.ndarray = field(default=None, init=False)
    draws: np.ndarray = field(default=None, init=False)  # (B, N) the PIT's v, from (PIT_SALT, seed, sample id)

    def run(self, session: DecodeSession) -> dict:
        if tuple(self.tokens.shape) != (session.batch, session.num_visual):
            raise ValueError(f"TeacherForced: tokens of shape {tuple(self.tokens.shape)}, the batch needs "
                             f"({session.batch}, {session.num_visual})")
        self.tokens = self.tokens.to(session.device)
        self.log_p = np.full(tuple(self.tokens.shape), np.nan)
        self.pit = np.full(tuple(self.tokens.shape), np.nan)
        self.draws = np.stack([np.random.default_rng([PIT_SALT, session.seed, int(i)]).random(session.num_visual)
                               for i in session.sample_ids.tolist()])
        return super().run(session)

    def next_token(self, session: DecodeSession, index: int) -> torch.Tensor:
        token = self.tokens[:, index]
        if session.forced(index) is None:
            p = session.distribution(index).double()
            self.log_p[:, index], self.pit[:, index] = randomized_pit(p, token, self.draws[:, index])
        return token


def randomized_pit(p: torch.Tensor, token: torch.Tensor, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log p(token) and u = P(ranked before token) + v p(token), tokens ranked by descending p, ties by id.
    p (B, V), token (B,), v (B,) in [0, 1) -> two (B,) float64 arrays."""
    p_x = p.gather(1, token[:, None])  # (B, 1)
    ids = torch.arange(p.shape[1], device=p.device)[None]
    before = (p > p_x) | ((p == p_x) & (ids < token[:, None]))
    mass = (p * before).sum(1).cpu().numpy()
    p_x = p_x[:, 0].cpu().numpy()
    with np.errstate(divide="ignore"):
        return np.log(p_x), mass + v * p_x


def score_tokens(generator, policy, budget, conditions, sample_ids: torch.Tensor, tokens: torch.Tensor, seed: int,
                 batch_size: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """log p and PIT (n, N) of given tokens (n, N) under the generator's sampling and `policy` at `budget`,
    teacher-forced in batches; sample i's PIT draws depend on (seed, sample_ids[i]) only."""
    log_p, pit = [], []
    for start in range(0, len(tokens), batch_size):
        rows = slice(start, start + batch_size)
        method = TeacherForced(tokens=tokens[rows])
        generator.generate(conditions[rows], sample_ids[rows], policy, budget, seed, method)
        log_p.append(method.log_p)
        pit.append(method.pit)
    return np.concatenate(log_p), np.concatenate(pit)


def pit_summary(log_p: np.ndarray, pit: np.ndarray) -> dict:
    """The tests on PIT values (n, N) (NaN: forced tokens, skipped): the mean of u against 1/2 (z, two-sided p),
    Kolmogorov-Smirnov against U(0, 1), a 10-bin chi-square, the share of u below 0.1 (a sampler too sure of
    itself raises it), and the mean log p per token with its standard error over images."""
    u = pit[np.isfinite(pit)]
    n = len(u)
    z = (u.mean() - 0.5) / np.sqrt(1 / 12 / n)
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    per_image = np.nanmean(log_p, axis=1)
    ks = stats.kstest(u, "uniform")
    return {"tokens": n, "images": len(pit), "mean_pit": float(u.mean()), "mean_pit_z": float(z),
            "mean_pit_p": float(2 * stats.norm.sf(abs(z))), "ks_d": float(ks.statistic), "ks_p": float(ks.pvalue), "decile_chi2_p": float(stats.chisquare(counts).pvalue),
            "pit_below_0.1": float((u < 0.1).mean()), "log_p_per_token": float(per_image.mean()),
            "log_p_per_token_se": float(per_image.std(ddof=1) / np.sqrt(len(per_image)))}
