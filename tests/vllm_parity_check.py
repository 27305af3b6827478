"""vLLM parity check for the `vlm-judge` reward's vLLM output parsing. Run it INSIDE a side
venv that holds vLLM (see tests/test_vllm_parity.py for how to build one), not the project's.

It builds a tiny random text-only `Qwen2ForCausalLM` whose hand-made tokenizer has the single
tokens "Yes" and "No", saves it to a temporary directory, and for a few fixed prompts (passed
as token ids) compares

- transformers: log_softmax of the model's last-position logits at the Yes / No ids, with
- vLLM: a real `vllm.LLM(...).generate(...)` driven by raydraft's own
  `VllmEngine.next_token_logprobs` (so `SamplingParams(max_tokens=1, temperature=0.0,
  logprobs=k)` as the reward asks for them) and read by raydraft's `logprobs_from_outputs`.

The engine is built by `VllmEngine.load` (so `max_logprobs=k`), with k the vocabulary size:
every token comes back. Only the requests differ from the reward's: token ids, no image (no
VLM runs on the CPU build of vLLM). As a control the same outputs are also read at a wrong
token id, which must differ from transformers' Yes / No by far more than the tolerance.

Prints one JSON line; exits 1 if the largest |difference| exceeds the tolerance (or the
control does not tell the tokens apart). `--misread` reads vLLM's answer with Yes and No
swapped, to see the check fail.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

# raydraft from this checkout, whatever the side venv holds, and the tests' tiny tokenizer
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).parent)]

TOLERANCE = 1e-5
CONTROL_MIN = 1e-3  # a wrong token id must be at least this far off
TEXTS = [
    "<|im_start|>user\nIs the cat red?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nDoes this show two dogs and a ball?<|im_end|>\n<|im_start|>assistant\n",
    "Answer Yes or No: is 7 prime?",
    "No",
    "<|im_start|>system\nYou are a judge.<|im_end|>\n<|im_start|>user\nYes or No?<|im_end|>\n"
    "<|im_start|>assistant\n",
]
LOGIT_SCALE = 30.0  # Yes / No log-probabilities far from uniform and spread across prompts


def tiny_tokenizer():
    from tiny_tokenizers import QWEN_TEXT_SPECIAL, yes_no_tokenizer

    return yes_no_tokenizer(QWEN_TEXT_SPECIAL)


def save_tiny_qwen2(path: str, seed: int = 0) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    yes, no = (tokenizer.convert_tokens_to_ids(t) for t in ("Yes", "No"))
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        max_position_embeddings=256, tie_word_embeddings=False, torch_dtype="float32",
        bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[[yes, no]] *= LOGIT_SCALE
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def transformers_logprobs(path: str, prompts: list[list[int]]):
    """(B, V) log_softmax of the last-position logits, one unpadded forward per prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        rows = [model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1) for ids in prompts]
    return torch.stack(rows)


class TokenIdVllmEngine:
    """raydraft's `VllmEngine` with text-only requests: `prompts` are token-id lists, no
    images. Everything else (`load`, `next_token_logprobs`) is raydraft's."""

    @staticmethod
    def make(path: str, logprobs: int):
        from raydraft.rewards.vlm_judge import VllmEngine

        class Engine(VllmEngine):
            @staticmethod
            def requests(images, prompts):
                return [{"prompt_token_ids": list(p)} for p in prompts]

        return Engine.load(
            path, logprobs, limit_mm_per_prompt={}, dtype="float32", enforce_eager=True,
            max_model_len=256, max_num_seqs=len(TEXTS), seed=0,
        )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--misread", action="store_true", help="swap Yes and No on vLLM's side")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes a lot more
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # a small, shared machine
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    import torch

    torch.set_num_threads(1)  # tiny matrices
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tiny_qwen2_") as path:
        save_tiny_qwen2(path)
        tokenizer = tiny_tokenizer()
        prompts = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
        yes, no = (tokenizer.convert_tokens_to_ids(t) for t in ("Yes", "No"))
        vocab = len(tokenizer)
        wrong = next(t for t in range(vocab) if t not in (yes, no))
        hf = transformers_logprobs(path, prompts)
        hf_seconds = time.monotonic() - start

        engine = TokenIdVllmEngine.make(path, logprobs=vocab)  # k = V: every token comes back
        load_seconds = time.monotonic() - start - hf_seconds
        read = (no, yes) if args.misread else (yes, no)
        got = engine.next_token_logprobs([None] * len(prompts), prompts, read)
        control = engine.next_token_logprobs([None] * len(prompts), prompts, (wrong, wrong))
        vllm_seconds = time.monotonic() - start - hf_seconds - load_seconds

    expected = hf[:, [yes, no]]
    diff = (got - expected).abs().max().item()
    control_diff = (control - expected).abs().min().item()
    spread = (expected.max(0).values - expected.min(0).values).min().item()
    ok = diff <= TOLERANCE and control_diff >= CONTROL_MIN
    report = {
        "ok": ok, "max_abs_diff": diff, "tolerance": TOLERANCE,
        "control_min_abs_diff": control_diff, "control_min": CONTROL_MIN,
        "spread_across_prompts": spread, "misread": args.misread,
        "yes_no_ids": [yes, no], "wrong_id": wrong, "vocab": vocab, "k": vocab,
        "prompt_lengths": [len(p) for p in prompts],
        "transformers": expected.tolist(), "vllm": got.tolist(),
        "seconds": {"transformers": round(hf_seconds, 1), "vllm_load": round(load_seconds, 1),
                    "vllm_generate": round(vllm_seconds, 1)},
    }  # fmt: skip
    if not math.isfinite(diff):
        report["ok"], ok = False, False
    print(json.dumps(report), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
