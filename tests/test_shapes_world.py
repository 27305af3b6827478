"""The shapes world and its rule-based checker (`toy-geneval`)."""

from collections import Counter

import numpy as np
import pytest
import torch

from raydraft.data.prompts import load_prompts
from raydraft.data.shapes import (
    CATEGORIES,
    all_specs,
    layout,
    render,
    sample_scenes,
    spec_for_prompt,
    split_specs,
)
from raydraft.rewards.registry import make_reward
from raydraft.rewards.shapes_checker import check, clauses, detect


def test_scenes_are_deterministic_in_their_seed():
    spec = spec_for_prompt("a red circle and a blue square")
    assert layout(spec, 7) == layout(spec, 7)
    assert np.array_equal(render(layout(spec, 7)), render(layout(spec, 7)))
    assert layout(spec, 7) != layout(spec, 8)


def test_grammar_covers_every_category_with_the_expected_prompts():
    texts = {s.text for s in all_specs()}
    assert {s.category for s in all_specs()} == set(CATEGORIES)
    for prompt in [
        "a circle",
        "a circle and a square",
        "one triangle",
        "four squares",
        "a yellow triangle",
        "a circle below a triangle",
        "a red circle and a blue square",
    ]:
        assert prompt in texts
    assert len(texts) == len(all_specs())  # every prompt names one spec


def test_eval_combinations_never_appear_in_training():
    train = {s.text for s in split_specs("train")}
    held_out = [s for s in split_specs("eval") if s.category not in ("single", "two")]
    assert held_out and not train & {s.text for s in held_out}
    assert {s.category for s in held_out} == {"counting", "colors", "position", "binding"}
    # every shape and colour still appears in training
    words = {w for t in train for w in t.split()}
    assert {"red", "green", "blue", "yellow", "circle", "square", "triangle"} <= words


def test_the_training_prompt_set_weighs_every_category_about_equally():
    """RL epochs see categories as pretraining and the evaluation weigh them, not 19:1."""
    prompts = load_prompts("shapes-train")
    share = Counter(spec_for_prompt(p).category for p in prompts)
    assert set(share) == set(CATEGORIES)
    assert max(share.values()) / min(share.values()) < 1.2
    assert set(prompts) == {s.text for s in split_specs("train")}


def test_checker_is_right_on_rendered_truth_for_every_prompt():
    results = [
        check(render(layout(spec, seed)), spec.text) for spec in all_specs() for seed in range(4)
    ]
    assert np.mean([ok for _, ok in results]) >= 0.99


def test_checker_agrees_with_the_layout_labels_on_other_prompts():
    """Detection on pixels gives the same verdict as the exact clauses on the layout."""
    specs = all_specs()
    rng = np.random.default_rng(0)
    agree = []
    for i in range(60):
        objects = layout(specs[i * 7 % len(specs)], i)
        found = detect(render(objects))
        for other in rng.choice(len(specs), 10):
            agree.append(all(clauses(specs[other], found)) == all(clauses(specs[other], objects)))
    assert np.mean(agree) >= 0.99


def test_checker_is_near_zero_on_noise_and_blank_images():
    rng = np.random.default_rng(0)
    specs = all_specs()
    noise = [check((rng.random((32, 32, 3)) * 255).astype(np.uint8), s.text)[1] for s in specs]
    blank = [check(np.zeros((32, 32, 3), np.uint8), s.text)[0] for s in specs]
    assert np.mean(noise) < 0.02 and np.mean(blank) == 0.0


def test_checker_reward_scores_dense_and_strict():
    specs = [spec_for_prompt("a red circle and a blue square")]
    images = sample_scenes(specs, [3])
    wrong = ["a blue circle and a red square"]
    dense, strict = make_reward("toy-geneval"), make_reward("toy-geneval", {"strict": True})
    assert float(dense.score(images, [specs[0].text], [{}])) == 1.0
    partial = float(dense.score(images, wrong, [{}]))
    assert 0 < partial < 1 and float(strict.score(images, wrong, [{}])) == 0.0
    with pytest.raises(KeyError, match="not a prompt of the shapes world"):
        dense.score(torch.zeros(1, 3, 32, 32), ["a purple hexagon"], [{}])
