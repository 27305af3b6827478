"""A character-level tokenizer with Qwen's special tokens and single-token "Yes" and "No":
what the VLM judge's tests and the vLLM parity script build their tiny Qwen models on
(it imports only tokenizers and transformers, so it runs in vLLM's side venv too)."""

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

QWEN_TEXT_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_VISION_SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def yes_no_tokenizer(special: list[str]) -> PreTrainedTokenizerFast:
    """One token per character, plus `special` (Qwen's, <|endoftext|> first: the padding)
    and the words "Yes" and "No"."""
    vocab = ["<unk>", *special, "Yes", "No", *sorted(set(string.printable))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"Yes|No|[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<|endoftext|>",
        eos_token="<|im_end|>", additional_special_tokens=special[1:],
    )  # fmt: skip
