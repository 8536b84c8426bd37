"""What a decoding method is: a typed object chosen when generating, that fills a batch's tokens through a
`DecodeSession` (lineareval/decoding/session.py) and nothing else.

The session is the whole interface: the next-token distribution of every image (`sample` draws from it,
`feed` advances it by one token), the target distributions of a chunk of tokens per image at once
(`distributions`), `commit(counts)` to keep a prefix of each chunk, and the schedule facts a method may
plan with (`next_eviction`, `forced`, `allowed`). A method never reaches into the decoder, the model or
the caches, so a new method (`conf/decoding/<name>.yaml`, `_target_` a `DecodingMethod`) runs for every
model family, and the record names the method that ran (`Generation.method`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from lineareval.decoding.session import DecodeSession


class DecodingMethod:
    """Base class of `decoding=...`: a name (the Hydra choice), whether it samples sequential decoding's
    distribution, the most tokens per sequence it feeds at once (`max_chunk`, which sizes the caches),
    its settings for the record (`describe`) and `run`."""

    name: str = "base"
    max_chunk: ClassVar[int] = 1
    distribution_preserving: ClassVar[bool] = True

    def named(self, name: str) -> DecodingMethod:
        """The method labelled with its Hydra choice (`conf/decoding/<name>.yaml`)."""
        self.name = name
        return self

    def describe(self) -> dict:
        """The method's name and settings, as the record stores them."""
        return {"name": self.name}

    def run(self, session: DecodeSession) -> dict:
        """Fill `session.tokens` (B, N); returns the method's statistics: `decode_passes_per_image`,
        `tokens_per_pass` (and e.g. `draft_acceptance`)."""
        raise NotImplementedError


@dataclass
class Sequential(DecodingMethod):
    """`decoding=sequential`: one token per step (the default and the reference)."""

    name: str = "sequential"

    def run(self, session: DecodeSession) -> dict:
        for index in range(session.num_visual):
            token = self.next_token(session, index)
            session.tokens[:, index] = token
            if index == session.num_visual - 1:
                break
            session.feed(token, index)
            session.stepped(index)
        passes = session.num_visual - 1
        return {"decode_passes_per_image": float(passes), "tokens_per_pass": 1.0, "decode_passes_batch": passes}

    def next_token(self, session: DecodeSession, index: int):
        """Visual token `index` of every image (B,): drawn from the session (`TeacherForced` gives its own)."""
        return session.sample(index)
