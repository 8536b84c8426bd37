"""Checks on the tokenizers of the text-conditional models, run once when a model is built.

A tokenizer that loads without an error can still encode prompts differently from the official code:
some transformers 5 releases load a byte-level BPE `tokenizer.json` (Chameleon's, DeepSeek's) through
a tokenizer class whose pre-tokenizer drops the spaces (63 ids instead of 74 for the same Lumina
prompt), and the ids the official code looks up by name (`<｜▁pad▁｜>`) may not be the ones our
defaults assume. These checks stop the run with the fix instead of generating from wrong prompts.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Words, spaces and punctuation, as every benchmark prompt has them.
ROUND_TRIP_PROBE = "A red apple, two cats and a wooden table."


def is_real_tokenizer(tokenizer: object) -> bool:
    """A transformers tokenizer loaded from files (not the word-hash stand-in of random-weight speed runs)."""
    return hasattr(tokenizer, "decode") and hasattr(tokenizer, "get_vocab")


def check_round_trip(tokenizer, source: str | Path, probe: str = ROUND_TRIP_PROBE) -> None:
    """Stop if decoding the encoded `probe` does not give it back (e.g. a tokenizer class that drops spaces)."""
    import transformers

    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if decoded != probe:
        raise ValueError(
            f"The tokenizer in {source} does not round-trip a prompt with spaces under transformers "
            f"{transformers.__version__} (loaded as {type(tokenizer).__name__}): {probe!r} -> {len(ids)} ids -> "
            f"{decoded!r}. Prompts would not be encoded as the official code encodes them. Install the "
            "transformers version of requirements.txt, or set \"tokenizer_class\": \"TokenizersBackend\" (transformers"
            " 5) / \"PreTrainedTokenizerFast\" (4.x) in that folder's tokenizer_config.json.")


def vocabulary_id(tokenizer, token: str, source: str | Path) -> int:
    """The id the tokenizer's vocabulary gives `token`, as the official code looks it up (`vocab.get(token)`)."""
    token_id = tokenizer.get_vocab().get(token)
    if token_id is None:
        raise ValueError(f"The tokenizer in {source} has no token {token!r}, which the official generation code "
                         "uses; is model.path the right model's folder?")
    return int(token_id)


def bos_id(tokenizer, source: str | Path) -> int:
    """BOS as the official code takes it (Lumina's xllmx Tokenizer: the EOS id when a tokenizer has no BOS)."""
    found = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if found is None:
        raise ValueError(f"The tokenizer in {source} defines neither a BOS nor an EOS token; prompts start with one.")
    return int(found)
