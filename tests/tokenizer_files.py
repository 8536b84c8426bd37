"""Tiny tokenizer folders in the layout the hub ships: tokenizer.json, tokenizer_config.json, special_tokens_map.json.

The tokenizer is a byte-level BPE, as DeepSeek's (Janus-Pro) and Meta's Chameleon (Lumina-mGPT) are:
the 256 byte symbols at consecutive ids and no merges, so every text round-trips exactly while the
special tokens sit at the ids the real vocabularies give them.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers.pre_tokenizers import ByteLevel


def _added(token: str, token_id: int) -> dict:
    return {"id": token_id, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def write_byte_level_tokenizer(folder: Path, special: dict[str, int], first_byte_id: int, *, bos: str, eos: str,
                               pad: str, tokenizer_class: str = "LlamaTokenizerFast", post_bos: bool = False,
                               drop_spaces: bool = False) -> Path:
    """Write a tokenizer folder. `post_bos`: the post-processor prepends BOS (like Llama's); `drop_spaces`: the
    pre-tokenizer splits on whitespace and discards it, as a wrongly loaded byte-level tokenizer does."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {symbol: first_byte_id + index for index, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    clash = set(vocab.values()) & set(special.values())
    assert not clash, f"special ids {clash} collide with the byte symbols"
    vocab.update(special)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    pre_tokenizer = ({"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, byte_level]}
                     if drop_spaces else byte_level)
    post = None
    if post_bos:
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [special[bos]], "tokens": [bos]}}}
    document = {"version": "1.0", "truncation": None, "padding": None,
                "added_tokens": [_added(token, token_id) for token, token_id in sorted(special.items(),
                                                                                      key=lambda item: item[1])],
                "normalizer": None, "pre_tokenizer": pre_tokenizer, "post_processor": post, "decoder": byte_level,
                "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                          "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                          "ignore_merges": False, "vocab": vocab, "merges": []}}
    (folder / "tokenizer.json").write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    config = {"tokenizer_class": tokenizer_class, "bos_token": bos, "eos_token": eos, "pad_token": pad,
              "add_bos_token": True, "add_eos_token": False, "model_max_length": 16384, "legacy": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    tokens_map = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    (folder / "special_tokens_map.json").write_text(json.dumps(tokens_map, ensure_ascii=False), encoding="utf-8")
    return folder


JANUS_SPECIAL = {"<｜▁pad▁｜>": 0, "<｜begin▁of▁sentence｜>": 1, "<begin_of_image>": 2, "<｜end▁of▁sentence｜>": 3,
                 "<|User|>": 4, "<|Assistant|>": 5, "<image_placeholder>": 6}


def write_janus_tokenizer(folder: Path, pad: str = "<｜▁pad▁｜>", **kwargs) -> Path:
    """DeepSeek's Janus-Pro tokenizer layout: LlamaTokenizerFast over a byte-level BPE, BOS from the post-processor."""
    return write_byte_level_tokenizer(folder, JANUS_SPECIAL, 10, bos="<｜begin▁of▁sentence｜>",
                                      eos="<｜end▁of▁sentence｜>", pad=pad, post_bos=kwargs.pop("post_bos", True),
                                      **kwargs)


# Chameleon's ids for the tokens Lumina-mGPT's prompt uses; byte symbols placed above them.
LUMINA_SPECIAL = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<reserved08706>": 8710}


def write_lumina_tokenizer(folder: Path, **kwargs) -> Path:
    return write_byte_level_tokenizer(folder, LUMINA_SPECIAL, 8720, bos="<s>", eos="</s>", pad="<pad>", **kwargs)
