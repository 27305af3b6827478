"""The `geneval` reward: GenEval's rules (Flow-GRPO's reward-server `gen_eval.py`) on
constructed detections with known answers, then the Mask2Former detector, the CLIP colour
classifier and the reward end to end on tiny random models of the real transformers
classes, saved and loaded through the reward's own loaders."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_models import save_tiny_clip
from transformers import (
    AutoProcessor,
    CLIPModel,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    SwinConfig,
)

from raydraft.rewards.detectors import (
    COCO_TO_GENEVAL,
    COLORS,
    GENEVAL_OBJECTS,
    ClipColorClassifier,
    Detection,
    Mask2FormerDetector,
    Mask2FormerImageProcessorPil,
    geneval_class_names,
    object_crop,
)
from raydraft.rewards.geneval import (
    COUNTING_THRESHOLD,
    MAX_OBJECTS,
    THRESHOLD,
    evaluate,
    geneval_rules,
    relative_position,
    select_objects,
)
from raydraft.rewards.registry import make_reward


def det(label, confidence=0.95, box=(0, 0, 10, 10), color=None):
    return Detection(label, confidence, tuple(float(v) for v in box), color=color)


def one(cls, count=1, **extra):
    return {"class": cls, "count": count, **extra}


# --- rules on constructed detections ----------------------------------------------------


def test_single_object_present_and_absent():
    meta = {"tag": "single_object", "include": [one("bench")]}
    present = geneval_rules(meta, [det("bench"), det("dog")])
    assert (present.strict, present.correct, present.score) == (True, True, 1.0)
    absent = geneval_rules(meta, [det("dog"), det("bench", confidence=0.2)])
    assert (absent.strict, absent.correct, absent.score) == (False, False, 0.0)
    assert absent.clauses[0].found == 0 and "expected bench==1, found 0" in absent.clauses[0].reason


def test_confidence_threshold_is_strict():
    meta = {"tag": "single_object", "include": [one("bench")]}
    assert geneval_rules(meta, [det("bench", THRESHOLD)]).score == 0.0
    assert geneval_rules(meta, [det("bench", THRESHOLD + 1e-6)]).score == 1.0


def test_two_objects_one_missing_gets_half():
    meta = {"tag": "two_object", "include": [one("cat"), one("dog")]}
    assert geneval_rules(meta, [det("cat"), det("dog")]).score == 1.0
    half = geneval_rules(meta, [det("cat")])
    assert half.score == 0.5 and not half.strict and not half.correct
    assert [c.terms for c in half.clauses] == [(1.0,), (0.0,)]


def test_counting_exact_off_by_one_and_its_confidence_threshold():
    meta = {
        "tag": "counting",
        "include": [one("clock", 3)],
        "exclude": [one("clock", 4)],
    }
    three = [det("clock", c) for c in (0.99, 0.95, 0.91)]
    assert geneval_rules(meta, three).score == 1.0
    # below 0.9 a counting prompt does not count the object: 2 of 3, 1 - 1/3
    low = [det("clock", c) for c in (0.99, 0.95, COUNTING_THRESHOLD)]
    result = geneval_rules(meta, low)
    assert result.clauses[0].found == 2
    assert result.score == pytest.approx(2 / 3) and not result.strict and not result.correct
    # the same detections on a non-counting tag count all three
    assert geneval_rules({**meta, "tag": "single_object"}, low).clauses[0].found == 3
    # one too many: 1 - 1/3 for training, and the exclusion fails GenEval's benchmark
    four = geneval_rules(meta, [*three, det("clock", 0.93)])
    assert four.score == pytest.approx(2 / 3)
    assert not four.strict and not four.correct and four.clauses[1].reason


def test_count_credit_goes_negative_as_in_the_reference():
    meta = {"tag": "single_object", "include": [one("cup")]}
    result = geneval_rules(meta, [det("cup") for _ in range(4)])
    assert result.score == -2.0  # 1 - |4 - 1| / 1, unclamped
    assert not result.strict and result.correct  # GenEval's "at least one"


def test_strict_needs_exact_counts_while_the_benchmark_needs_at_least():
    meta = {"tag": "counting", "include": [one("kite", 2)]}
    result = geneval_rules(meta, [det("kite") for _ in range(3)])
    assert (result.strict, result.correct, result.score) == (False, True, 0.5)


def test_exclusions_fail_the_benchmark_only():
    meta = {"tag": "two_object", "include": [one("dog", 2)], "exclude": [one("cat")]}
    with_cat = geneval_rules(meta, [det("dog"), det("dog"), det("cat")])
    assert with_cat.strict and with_cat.score == 1.0  # the reference's strict ignores them
    assert not with_cat.correct and with_cat.clauses[1].kind == "exclude"
    without = geneval_rules(meta, [det("dog"), det("dog"), det("cat", 0.1)])
    assert without.correct and without.strict


def test_colors_right_and_wrong():
    meta = {"tag": "colors", "include": [one("car", color="red")]}
    right = geneval_rules(meta, [det("car", color="red")])
    assert (right.strict, right.correct, right.score) == (True, True, 1.0)
    wrong = geneval_rules(meta, [det("car", color="blue")])
    assert (wrong.strict, wrong.correct, wrong.score) == (False, False, 0.5)
    assert wrong.clauses[0].color_matches == 0
    # two asked, one red: 1 - 1/2 for the colour term
    two = {"tag": "colors", "include": [one("car", 2, color="red")]}
    half = geneval_rules(two, [det("car", color="red"), det("car", color="green")])
    assert half.clauses[0].terms == (1.0, 0.5) and half.score == 0.75
    # a wrong count scores the colour 0 without looking at it
    missing = geneval_rules(meta, [])
    assert missing.clauses[0].terms == (0.0, 0.0) and missing.clauses[0].color_matches is None


def test_colors_come_from_the_classifier_on_the_kept_objects():
    meta = {"tag": "colors", "include": [one("car", 2, color="red")]}
    seen = []

    def classify(cls, objects):
        seen.append((cls, [o.confidence for o in objects]))
        return ["red", "yellow"]

    detections = [det("car", 0.5), det("car", 0.9), det("car", 0.1), det("bus", color="red")]
    result = geneval_rules(meta, detections, classify)
    assert seen == [("car", [0.9, 0.5])]  # most confident first, below-threshold dropped
    assert result.clauses[0].color_matches == 1 and result.score == 0.75
    with pytest.raises(ValueError, match="colour"):
        geneval_rules(meta, detections[:2])


def test_attribute_binding_checks_each_colour_on_its_own_object():
    meta = {
        "tag": "color_attr",
        "include": [one("giraffe", color="brown"), one("stop sign", color="white")],
    }
    bound = [det("giraffe", color="brown"), det("stop sign", color="white")]
    swapped = [det("giraffe", color="white"), det("stop sign", color="brown")]
    assert geneval_rules(meta, bound).strict and geneval_rules(meta, bound).score == 1.0
    result = geneval_rules(meta, swapped)
    assert not result.strict and not result.correct and result.score == 0.5
    assert [c.terms for c in result.clauses] == [(1.0, 0.0), (1.0, 0.0)]


@pytest.mark.parametrize(
    ("offset", "size", "expected"),
    [
        ((-20, 0), 10, {"left of"}),
        ((20, 0), 10, {"right of"}),
        ((0, -20), 10, {"above"}),
        ((0, 20), 10, {"below"}),
        ((-10, -10), 10, {"left of", "above"}),
        ((-1.5, 0), 10, set()),  # inside the margin: 0.1 × (10 + 10) = 2 pixels
        # past the margin the shrunk offset must still be over half the offset: |dx| > 4
        ((-3.9, 0), 10, set()),
        ((-4.1, 0), 10, {"left of"}),
        ((-15, 0), 100, set()),  # the margin grows with the boxes: 20 pixels
        ((-10, -7.5), 10, {"left of"}),  # without the margin it would also be above
    ],
)
def test_relative_position(offset, size, expected):
    b = (100, 100, 100 + size, 100 + size)
    a = (b[0] + offset[0], b[1] + offset[1], b[2] + offset[0], b[3] + offset[1])
    assert relative_position(a, b) == expected


def position_meta(relation):
    return {
        "tag": "position",
        "include": [one("laptop"), one("cow", position=[relation, 0])],
    }


LAPTOP = (100, 100, 140, 140)
PLACES = {
    "left of": (20, 100, 60, 140),
    "right of": (180, 100, 220, 140),
    "above": (100, 20, 140, 60),
    "below": (100, 180, 140, 220),
}


@pytest.mark.parametrize("relation", list(PLACES))
def test_position_each_relation(relation):
    for place, box in PLACES.items():
        result = geneval_rules(
            position_meta(relation), [det("laptop", box=LAPTOP), det("cow", box=box)]
        )
        assert result.strict == result.correct == (place == relation)
        assert result.clauses[1].position_ok == (place == relation)
        # a failed position adds 0 and then the reference's stray 1: (1 + 1 + 0 + 1) / 4
        assert result.score == (1.0 if place == relation else 0.75)


def test_position_without_its_target_or_with_a_wrong_count():
    meta = position_meta("right of")
    no_target = geneval_rules(meta, [det("cow", box=PLACES["right of"])])
    assert no_target.clauses[1].terms == (1.0, 0.0) and no_target.score == pytest.approx(1 / 3)
    assert not no_target.strict and not no_target.correct
    cows = [det("cow", box=PLACES["right of"]), det("cow", 0.5, box=PLACES["left of"])]
    two_cows = geneval_rules(meta, [det("laptop", box=LAPTOP), *cows])
    assert two_cows.clauses[1].terms == (0.0, 0.0) and not two_cows.strict
    assert two_cows.correct  # the benchmark checks the most confident cow only


def test_a_failed_colour_skips_the_position_term():
    meta = {
        "tag": "position",
        "include": [one("laptop"), one("cow", color="red", position=["right of", 0])],
    }
    result = geneval_rules(
        meta, [det("laptop", box=LAPTOP), det("cow", box=PLACES["right of"], color="blue")]
    )
    assert result.clauses[1].terms == (1.0, 0.0) and result.clauses[1].position_ok is None


def test_at_most_16_objects_per_class_the_most_confident():
    detections = [det("donut", 0.31 + 0.01 * i) for i in range(20)]
    kept = select_objects(detections, THRESHOLD)["donut"]
    assert len(kept) == MAX_OBJECTS
    assert [d.confidence for d in kept] == sorted((d.confidence for d in detections), reverse=True)[
        :16
    ]
    meta = {"tag": "counting", "include": [one("donut", 20)]}
    result = geneval_rules({**meta, "tag": "single_object"}, detections)
    assert result.clauses[0].found == 16 and result.score == pytest.approx(1 - 4 / 20)


def test_overlap_suppression_is_off_at_genevals_default():
    boxes = [det("dog", 0.9, (0, 0, 10, 10)), det("dog", 0.8, (1, 0, 11, 10))]
    assert len(select_objects(boxes, THRESHOLD)["dog"]) == 2
    assert len(select_objects(boxes, THRESHOLD, nms_threshold=0.5)["dog"]) == 1


def test_bad_metadata_is_an_error():
    with pytest.raises(ValueError, match="earlier"):
        evaluate({"tag": "position", "include": [one("cow", position=["right of", 0])]}, {})
    with pytest.raises(ValueError, match="colour"):
        evaluate({"tag": "colors", "include": [one("cow", color="teal")]}, {})
    with pytest.raises(ValueError, match="tag"):
        evaluate({"include": [one("cow")]}, {})


# --- detector and colour classifier on tiny random models -------------------------------

COCO_NAMES = [{v: k for k, v in COCO_TO_GENEVAL.items()}.get(n, n) for n in GENEVAL_OBJECTS]
DOG = COCO_NAMES.index("dog")
SIZE = 64


@pytest.fixture(scope="module")
def mask2former_dir(tmp_path_factory):
    """A Mask2Former with a 4-stage Swin of width 8 and COCO's 80 labels as transformers'
    checkpoints name them; its class head is biased towards "dog" so that its detections
    pass GenEval's thresholds."""
    torch.manual_seed(0)
    backbone = SwinConfig(
        image_size=SIZE,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=32,
        num_queries=10,
        id2label=dict(enumerate(COCO_NAMES)),
        label2id={n: i for i, n in enumerate(COCO_NAMES)},
    )
    model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        model.class_predictor.bias.zero_()
        model.class_predictor.bias[DOG] = 10.0
        # sharper masks: confident ones (mean sigmoid over the mask) reach the 0.9 of counting
        mask_head = model.model.transformer_module.decoder.mask_predictor.mask_embedder
        mask_head.layers[-1].layers[0].weight.mul_(100)
        mask_head.layers[-1].layers[0].bias.mul_(100)
    path = tmp_path_factory.mktemp("tiny-mask2former")
    model.save_pretrained(path)
    Mask2FormerImageProcessorPil(
        size={"shortest_edge": SIZE, "longest_edge": SIZE}
    ).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(3)
    smooth = F.interpolate(torch.rand(2, 3, 4, 4, generator=generator), size=(SIZE, SIZE))
    return (smooth + 0.1 * torch.rand(2, 3, SIZE, SIZE, generator=generator)).clamp(0, 1)


def as_pil(images):
    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


def test_class_names_use_genevals_spelling_for_coco_only():
    names = geneval_class_names(dict(enumerate(COCO_NAMES)))
    assert list(names.values()) == list(GENEVAL_OBJECTS)
    assert geneval_class_names({0: "mouse", 1: "cat"}) == {0: "mouse", 1: "cat"}


def test_mask2former_detector_output(mask2former_dir, images, one_torch_thread):
    detector = Mask2FormerDetector("geneval", mask2former_dir)
    assert detector.class_names[64] == "computer mouse"
    pil = as_pil(images)
    found = detector.detect(pil)
    assert len(found) == 2
    for detections in found:
        assert detections and all(d.label == "dog" for d in detections)
        for d in detections:
            assert THRESHOLD <= d.confidence <= 1
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            assert d.mask.shape == (SIZE, SIZE) and d.mask.dtype == bool
            rows, columns = np.nonzero(d.mask)
            assert (x0, y0, x1, y1) == (
                columns.min(),
                rows.min(),
                columns.max() + 1,
                rows.max() + 1,
            )
    assert detector.detect([]) == []


def test_object_crop_greys_out_the_background():
    image = Image.fromarray(np.full((20, 30, 3), 200, dtype=np.uint8))
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:10, 4:12] = True
    mask[9, 4] = False
    crop = np.asarray(object_crop(image, Detection("dog", 0.9, (4.0, 5.0, 12.0, 10.0), mask)))
    assert crop.shape == (5, 8, 3)
    assert (crop[4, 0] == 153).all() and (crop[0, 0] == 200).all()
    plain = object_crop(image, Detection("dog", 0.9, (4.0, 5.0, 12.0, 10.0)))
    assert (np.asarray(plain) == 200).all()


def reference_similarities(clip_dir, crops, cls):
    """clip_benchmark's zero_shot_classifier and run_classification (without its 100×
    scale) with GenEval's templates, on the same weights."""
    model, processor = CLIPModel.from_pretrained(clip_dir), AutoProcessor.from_pretrained(clip_dir)
    templates = [
        f"a photo of a {{c}} {cls}",
        f"a photo of a {{c}}-colored {cls}",
        "a photo of a {c} object",
    ]
    with torch.no_grad():
        weights = []
        for color in COLORS:
            texts = [t.format(c=color) for t in templates]
            embeds = model.get_text_features(
                **processor(text=texts, padding=True, return_tensors="pt")
            )
            embeds = F.normalize(getattr(embeds, "pooler_output", embeds), dim=-1).mean(0)
            weights.append(embeds / embeds.norm())
        pixels = processor(images=crops, return_tensors="pt")["pixel_values"]
        features = model.get_image_features(pixel_values=pixels)
        features = F.normalize(getattr(features, "pooler_output", features), dim=-1)
        return features @ torch.stack(weights, 1)


def test_color_classifier_is_genevals_zero_shot(clip_dir, one_torch_thread):
    generator = np.random.default_rng(0)
    image = Image.fromarray(generator.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    objects = []
    for i in range(6):
        mask = np.zeros((48, 64), dtype=bool)
        mask[4 * i : 4 * i + 20, 5 * i : 5 * i + 30] = True
        box = (5.0 * i, 4.0 * i, 5.0 * i + 30, 4.0 * i + 20)
        objects.append(Detection("teddy bear", 0.9, box, mask if i % 2 else None))
    crops = []
    for d in objects:
        pixels = np.asarray(image).copy()
        if d.mask is not None:
            pixels[~d.mask] = 153
        x0, y0, x1, y1 = (int(v) for v in d.box)
        crops.append(Image.fromarray(pixels[y0:y1, x0:x1]))
    expected = reference_similarities(clip_dir, crops, "teddy bear")
    classifier = ClipColorClassifier("geneval", clip_dir)
    similarities = classifier.similarities(image, objects, "teddy bear")
    torch.testing.assert_close(similarities, expected, rtol=0, atol=1e-5)
    colors = classifier.classify(image, objects, "teddy bear")
    assert colors == [COLORS[i] for i in expected.argmax(1)]
    assert set(classifier._classifiers) == {"teddy bear"}
    assert classifier.classify(image, [], "dog") == []


# --- the reward ---------------------------------------------------------------------------


def test_geneval_reward_end_to_end(mask2former_dir, clip_dir, images, one_torch_thread):
    reward = make_reward(
        "geneval", {"path": mask2former_dir, "clip_path": clip_dir, "device": "cpu"}
    )
    pil = as_pil(images)
    detections = reward.detector.detect(pil)
    kept = [select_objects(d, THRESHOLD).get("dog", []) for d in detections]
    dogs = [len(k) for k in kept]
    assert all(1 <= n <= 10 for n in dogs)
    color = reward.colors.classify(pil[1], kept[1][:1], "dog")[0]
    in_color = reward.colors.classify(pil[1], kept[1], "dog").count(color)
    metadata = [
        {"tag": "single_object", "include": [one("dog", dogs[0])], "prompt": "dogs"},
        {"tag": "color_attr", "include": [one("dog", dogs[1], color=color), one("person")]},
    ]
    prompts = ["a photo of dogs", f"a photo of {color} dogs and a person"]
    scores = reward.score(images, prompts, metadata)
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    assert ((scores >= 0) & (scores <= 1)).all()
    first, second = reward.last_results
    assert first.strict and first.score == 1.0 and scores[0] == 1.0
    assert reward.last_details["strict"].tolist() == [1.0, 0.0]  # strict accuracy, logged
    assert second.clauses[0].color_matches == in_color and not second.strict
    expected = (1 + (1 - abs(dogs[1] - in_color) / dogs[1]) + 0) / 3  # the person is missing
    assert scores[1].item() == pytest.approx(expected)
    assert second.as_dict()["clauses"][1]["found"] == 0

    # a counting prompt keeps only the dogs above 0.9
    confident = [len(select_objects(d, COUNTING_THRESHOLD).get("dog", [])) for d in detections]
    assert confident != dogs
    counting = [{"tag": "counting", "include": [one("dog", n + 1)]} for n in confident]
    scores = reward.score(images, prompts, counting)
    assert scores.tolist() == pytest.approx([1 - 1 / (n + 1) for n in confident])

    strict = make_reward(
        "geneval", {"path": mask2former_dir, "clip_path": clip_dir, "only_strict": True}
    )
    assert strict.score(images, prompts, metadata).tolist() == [1.0, 0.0]


def test_geneval_reward_needs_metadata_and_known_classes(mask2former_dir, clip_dir, images):
    reward = make_reward("geneval", {"path": mask2former_dir, "clip_path": clip_dir})
    with pytest.raises(ValueError, match=r"'a red dog'.*no GenEval metadata"):
        reward.score(
            images, ["a dog", "a red dog"], [{"tag": "single_object", "include": [one("dog")]}, {}]
        )
    with pytest.raises(ValueError, match="mouse"):
        reward.score(images, ["a", "b"], [{"tag": "single_object", "include": [one("mouse")]}] * 2)


def test_missing_weights_name_the_reward_and_option(mask2former_dir, clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"reward 'geneval': options\.path .*hf download"):
        make_reward("geneval", {"path": str(tmp_path / "absent"), "clip_path": clip_dir})
    with pytest.raises(FileNotFoundError, match=r"reward 'geneval': options\.clip_path"):
        make_reward("geneval", {"path": mask2former_dir, "clip_path": str(tmp_path / "absent")})
    with pytest.raises(ValueError, match=r"options\.clip_path"):
        make_reward("geneval", {"path": mask2former_dir})
