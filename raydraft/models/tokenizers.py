"""Tokenizers built in memory, for models with random weights (tests, benchmarks, the
toy model): the real CLIP and T5 tokenizer classes, with no vocabulary file to download."""

from __future__ import annotations

import string
from collections.abc import Sequence

from transformers import CLIPTokenizer, T5Tokenizer


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's printable stand-in character for each of the 256 bytes."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def byte_clip_tokenizer(words: Sequence[str] = (), max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over bytes, plus merges that make each of `words` one token.

    Any text still encodes (byte fallback); the shapes world's words become single
    tokens, so a tiny text encoder need not learn to spell.
    """
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words)):
        pieces = [*word[:-1], word[-1] + "</w>"]
        prefix = pieces[0]
        for piece in pieces[1:]:
            merges.append((prefix, piece))
            prefix += piece
            tokens.append(prefix)
    tokens = [*dict.fromkeys(tokens), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=list(dict.fromkeys(merges)),
        model_max_length=max_length,
    )


def char_t5_tokenizer() -> T5Tokenizer:
    """Unigram over characters and a few words, with T5's <pad>=0, </s>=1, <unk>=2 layout."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("▁" + w, -1.0) for w in ("a", "the", "of", "red", "blue", "cat", "dog")]
    return T5Tokenizer(vocab=pieces, extra_ids=0)
