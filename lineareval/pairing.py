"""A run's full-cache partner: the finished full-cache run of exactly the same samples.

Sample i depends only on (seed, i) and its condition, so a compressed run and the full-cache run of
the same model, weights, sampling settings, seed, conditions and sample count hold the same images
but for what the eviction changed. Two runs pair when their identities (`identity.json`,
lineareval/identity.py) are equal in everything but the `cache` group, `keep` and `budget_allocation`
(what the policy keeps, how many tokens and where): the config part (benchmark, model, sampling, the
decoding method, seed, `num_samples`, resolved device type and dtype) and the content part
(weight files, the SHA-256 of every condition, the number of samples, the resolution). Equal sample
counts are required rather than pairing on common indices: FID's small-sample bias depends on the
count, so a difference between runs of different sizes would carry that bias, and a run's own FID
and its differences would be over different sets.

The partner is searched for among finished runs under `<output_root>/<benchmark>` (`paired.partner=auto`)
or named (`paired.partner=PATH`). A run without one records why (`partner_reason`) instead of failing:
no finished full-cache run of the same samples yet, this run is the full cache itself, a named folder
that does not pair (with each field that differs), or a partner without images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lineareval.identity import differences
from lineareval.record import METRICS_FILE
from lineareval.runfolder import IDENTITY_FILE, stored_identity

log = logging.getLogger(__name__)

BASELINE = "full"  # lineareval.api.BASELINE, without importing the API here
POLICY_FIELDS = ("cache", "keep", "budget_allocation")  # what may differ between a run and its partner


@dataclass(frozen=True)
class Partner:
    """The partner's run folder, or None and the reason there is none."""

    run_dir: Path | None
    reason: str | None = None


def cache_name(identity: dict) -> str | None:
    cache = identity.get("config", {}).get("cache")
    return cache.get("name") if isinstance(cache, dict) else None


def mismatch(identity: dict, candidate: Path, needs_images: bool = True) -> str | None:
    """Why `candidate` is not the full-cache partner of a run of `identity`; None when it is."""
    stored = stored_identity(candidate)
    if stored is None or "content" not in stored:
        return f"{candidate} has no {IDENTITY_FILE} with its samples' content (made before it existed?)"
    if cache_name(stored) != BASELINE:
        return f"{candidate} is not a full-cache run (cache={cache_name(stored)})"
    if not (candidate / METRICS_FILE).is_file():
        return f"{candidate} holds no finished run (no {METRICS_FILE})"
    if needs_images and not (candidate / "samples.npz").is_file():
        return f"{candidate} holds no samples.npz (decode_images=false)"
    ours = {key: value for key, value in identity["config"].items() if key not in POLICY_FIELDS}
    theirs = {key: value for key, value in stored["config"].items() if key not in POLICY_FIELDS}
    changed = differences(theirs, ours) + differences(stored["content"], identity.get("content", {}), "content")
    return f"{candidate} holds other samples: " + "; ".join(changed) if changed else None


def find_partner(run_dir: str | Path, search_root: str | Path | None, named: str | None = None,
                 needs_images: bool = True) -> Partner:
    """The full-cache partner of the finished run in `run_dir`: `named` if given, else the first (by path)
    finished full-cache run of the same samples under `search_root`."""
    run_dir = Path(run_dir)
    identity = stored_identity(run_dir)
    if identity is None or "content" not in identity:
        return Partner(None, f"{run_dir} has no {IDENTITY_FILE} with its samples' content: nothing to pair on")
    if cache_name(identity) == BASELINE:
        return Partner(None, "this is the full-cache run: the other runs of its samples are paired with it")
    if named:
        reason = mismatch(identity, Path(named), needs_images)
        if reason:
            log.warning("paired.partner=%s: %s", named, reason)
        return Partner(None if reason else Path(named), reason and f"paired.partner={named} does not pair: {reason}")
    if search_root is None or not Path(search_root).is_dir():
        return Partner(None, f"no finished full-cache run to search: {search_root} does not exist")
    candidates = sorted(path.parent for path in Path(search_root).rglob(IDENTITY_FILE)
                        if path.parent.resolve() != run_dir.resolve())
    for candidate in candidates:
        if mismatch(identity, candidate, needs_images) is None:
            return Partner(candidate)
    return Partner(None, f"no finished full-cache run of the same samples under {search_root}: run the same "
                         "command with cache=full keep=1 first, then stage=evaluate here to add the paired metrics")
