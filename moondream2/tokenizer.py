"""Tokenizer loading: the real `moondream/starmie-v1`, a local tokenizer.json, or the builtin one.

The builtin tokenizer is a byte-level BPE with no merges (one token per UTF-8 byte at ids 512-767,
id 0 = end of text). It keeps the special-token ids of the real one, so the random-init presets run
offline; it is never used for a real checkpoint unless the user asks for it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from .errors import UserInputError

BUILTIN = "builtin"
BYTE_TOKEN_OFFSET = 512


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes, in byte-level BPE's usual order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def builtin_tokenizer() -> Tokenizer:
    vocab = {"<|endoftext|>": 0}
    vocab.update({ch: BYTE_TOKEN_OFFSET + i for i, ch in enumerate(_byte_alphabet())})
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    spec = {
        "version": "1.0",
        "added_tokens": [
            {"id": 0, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": []},
    }
    return Tokenizer.from_str(json.dumps(spec))


def load_tokenizer(source: str) -> Tokenizer:
    """`source` is "builtin", a path to a tokenizer.json (or a folder holding one), or a hub repo id."""
    if source == BUILTIN:
        return builtin_tokenizer()
    path = Path(source)
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise UserInputError(f"tokenizer file {path} not found: pass --tokenizer=PATH to a tokenizer.json")
        try:
            return Tokenizer.from_file(str(path))
        except Exception as err:
            raise UserInputError(f"tokenizer file {path} could not be read ({err}); is it a tokenizer.json?")
    try:
        return Tokenizer.from_pretrained(source)
    except Exception as err:
        raise UserInputError(
            f"could not fetch tokenizer {source!r} from the Hugging Face hub ({type(err).__name__}); "
            f"download its tokenizer.json while online and pass --tokenizer=PATH/tokenizer.json"
        ) from None
