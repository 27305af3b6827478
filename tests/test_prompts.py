"""Prompt files: plain text, or JSON lines whose metadata travels with every sample."""

import json

import pytest

from raydraft.build import prompt_stream
from raydraft.config import load_config
from raydraft.data.prompts import (
    PromptStream,
    load_prompts,
    load_prompts_with_metadata,
    prompt_category,
)
from raydraft.data.shapes import category_balanced, split_specs

GENEVAL = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}],
     "prompt": "a photo of a bench"},
    {"tag": "counting", "include": [{"class": "cup", "count": 3}],
     "exclude": [{"class": "cup", "count": 4}], "prompt": "a photo of three cups"},
]  # fmt: skip


def test_jsonl_prompts_carry_their_metadata_into_every_row(tmp_path):
    path = tmp_path / "train_metadata.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in GENEVAL) + "\n\n")
    prompts, metadata = load_prompts_with_metadata(str(path))
    assert prompts == load_prompts(str(path)) == [r["prompt"] for r in GENEVAL]
    assert metadata == GENEVAL
    stream = PromptStream(prompts, 2, 3, seed=0, shuffle=True, metadata=metadata)
    batch = stream.next_batch()
    assert len(batch) == 6
    for prompt, record in zip(batch.prompts, batch.metadata, strict=True):
        assert record == GENEVAL[prompts.index(prompt)]
    batch.metadata[0]["tag"] = "changed"  # rows hold copies: the stream's records stay
    assert stream.next_batch().metadata[0]["tag"] in ("single_object", "counting")


def test_text_files_and_prompt_sets_have_empty_metadata(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n a dog \n")
    assert load_prompts_with_metadata(str(path)) == (["a cat", "a dog"], [{}, {}])
    prompts, metadata = load_prompts_with_metadata("toy-colors")
    assert len(prompts) == len(metadata) and not any(metadata)
    assert PromptStream(["a cat"], 1, 2, 0, False).next_batch().metadata == [{}, {}]


@pytest.mark.parametrize(
    ("line", "message"),
    [("{not json", "line 2: Expecting"), ('{"tag": "x"}', 'line 2: expected .* "prompt"')],
)
def test_a_bad_jsonl_line_is_named(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GENEVAL[0]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_prompts_with_metadata(str(path))
    with pytest.raises(ValueError, match="2 metadata records for 1 prompts"):
        PromptStream(["a"], 1, 1, 0, False, metadata=[{}, {}])


def test_category_repeats_put_weak_categories_in_each_epoch_more_often():
    base = prompt_stream(load_config("toy-nft", ["data.category_repeats={}"]))
    weighted = prompt_stream(load_config("toy-nft", ["data.category_repeats={binding: 3}"]))

    def count(stream, category):
        rows = zip(stream.prompts, stream.metadata, strict=True)
        return sum(prompt_category(p, m) == category for p, m in rows)

    assert len(base.prompts) == len(category_balanced(split_specs("train")))
    assert count(weighted, "binding") == 3 * count(base, "binding")
    assert count(weighted, "single") == count(base, "single")
    # GenEval's metadata names the category ("tag") for any prompt text.
    assert prompt_category("a photo of a cat", {"tag": "single_object"}) == "single_object"
    assert prompt_category("a photo of a cat", {}) is None


def test_a_category_no_prompt_has_is_named():
    cfg = load_config("toy-nft", ["data.category_repeats={countng: 2}"])
    with pytest.raises(ValueError, match=r"no prompt of category 'countng'.*'counting'"):
        prompt_stream(cfg)
