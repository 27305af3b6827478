"""Train `toy-clipscore`, the shapes world's tiny CLIP-like differentiable reward.

    python -m raydraft.embedded.train_clipscore --minutes 6 --out raydraft/assets/toy-clipscore

Data: a pool of rendered scenes, most laid out for a prompt of the full grammar (train and
eval splits; counting, position and binding weighted 2, the others 1), the rest random
arrangements of 0-4 objects, all labelled EXACTLY against every prompt of the grammar by
`shapes_checker.clauses` on their layouts (all clauses true = positive). Pure-noise, blotch
and flat images join every batch as negatives for all prompts.

Loss: sigmoid (SigLIP) over all image × prompt pairs, where the prompt side is the whole
grammar (141 prompts, so it holds every in-batch prompt and every hard negative), taken as
the mean of three groups: positives, hard negatives (one edit from a positive,
`shapes_clip.hard_negatives`, plus each image's two highest-scoring negatives, mined online:
without them busy noise passes for "four squares") and the other negatives (half weight).

Robustness, since DRaFT climbs the reward's gradient and wins by any weakness: horizontal
flips (labels follow: left of <-> right of), specks below the checker's minimum area, colour
jitter, blur, Gaussian noise of varying strength, blended smooth noise, and a quarter of each
batch replaced by a 2-step L∞ PGD attack towards a false prompt, within ε up to 0.1 on the
objects and 0.25 on the black background (too little to change what the checker sees there,
so the labels stay exact), so that pixel noise cannot buy score.

Validation on scenes of fresh seeds: the scene's own prompt and its hard negatives, clean and
with Gaussian noise σ=0.1, and PGD attacks; the numbers are stored in `train_log.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raydraft.data.shapes import (
    CATEGORIES,
    COLORS,
    OBJECT_SIZES,
    SHAPES,
    SIZE,
    ShapeObject,
    all_specs,
    layout,
    render,
    to_tensor,
)
from raydraft.rewards.shapes_checker import clauses
from raydraft.rewards.shapes_clip import ClipConfig, ShapesClip, hard_negatives, save_clip

SPECS = all_specs()
TEXTS = [s.text for s in SPECS]
INDEX = {t: i for i, t in enumerate(TEXTS)}
PALETTE = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255
VALID_SEED_BASE = 2**31  # training seeds are below, validation seeds above
# counting, relations and attribute binding are the hard categories: they get more scenes
CATEGORY_WEIGHTS = {"single": 1, "two": 1, "counting": 2, "colors": 1, "position": 2, "binding": 2}


def random_scene(rng: np.random.Generator) -> list[ShapeObject]:
    """0-4 objects of any colours and shapes, placed without overlap."""
    n = int(rng.choice(5, p=[0.1, 0.25, 0.3, 0.2, 0.15]))
    objects: list[ShapeObject] = []
    for _ in range(200):
        if len(objects) == n:
            break
        size = int(rng.integers(*OBJECT_SIZES))
        x0, y0 = (int(v) for v in rng.integers(0, SIZE - size + 1, size=2))
        color = list(COLORS)[rng.integers(len(COLORS))]
        new = ShapeObject(color, SHAPES[rng.integers(len(SHAPES))], x0, y0, size)
        if not any(_overlaps(new, o) for o in objects):
            objects.append(new)
    return objects


def _overlaps(a: ShapeObject, b: ShapeObject, gap: int = 2) -> bool:
    return not (
        a.x0 + a.size + gap <= b.x0
        or b.x0 + b.size + gap <= a.x0
        or a.y0 + a.size + gap <= b.y0
        or b.y0 + b.size + gap <= a.y0
    )


def labels_for(objects: list[ShapeObject]) -> np.ndarray:
    return np.array([all(clauses(s, objects)) for s in SPECS])


def make_pool(n: int, rng: np.random.Generator, spec_fraction: float = 0.8):
    """(uint8 NHWC images, bool [n, prompts] labels)."""
    by_category = {c: [s for s in SPECS if s.category == c] for c in CATEGORIES}
    weights = np.array([CATEGORY_WEIGHTS[c] for c in CATEGORIES], dtype=float)
    images = np.zeros((n, SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.zeros((n, len(SPECS)), dtype=bool)
    for i in range(n):
        if rng.random() < spec_fraction:
            pool = by_category[CATEGORIES[rng.choice(len(CATEGORIES), p=weights / weights.sum())]]
            objects = layout(pool[rng.integers(len(pool))], int(rng.integers(VALID_SEED_BASE)))
        else:
            objects = random_scene(rng)
        images[i] = render(objects)
        labels[i] = labels_for(objects)
    return images, labels


def flip_permutation() -> torch.Tensor:
    """Prompt index of each prompt's mirror image (left of <-> right of)."""
    swap = {"left of": "right of", "right of": "left of"}
    perm = []
    for s in SPECS:
        text = s.text
        if s.relation in swap:
            text = text.replace(s.relation, swap[s.relation])
        perm.append(INDEX[text])
    return torch.tensor(perm)


def neighbour_matrix() -> torch.Tensor:
    """[i, j] = prompt j is a hard negative of prompt i."""
    m = torch.zeros(len(SPECS), len(SPECS))
    for i, s in enumerate(SPECS):
        for h in hard_negatives(s):
            m[i, INDEX[h.text]] = 1
    return m


def smooth_noise(n: int, g: torch.Generator, channels: int = 3) -> torch.Tensor:
    cells = int(torch.randint(2, 9, (1,), generator=g))
    coarse = torch.rand(n, channels, cells, cells, generator=g)
    return F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def noise_images(n: int, g: torch.Generator) -> torch.Tensor:
    """Images that show no prompt: noise of several kinds, blotches, flat colours."""
    kind = torch.randint(0, 5, (n, 1, 1, 1), generator=g)
    uniform = torch.rand(n, 3, SIZE, SIZE, generator=g)
    grey = torch.rand(n, 1, 1, 1, generator=g)
    gauss = grey + torch.rand(n, 1, 1, 1, generator=g) * 0.3 * torch.randn(
        n, 3, SIZE, SIZE, generator=g
    )
    blotch = smooth_noise(n, g)
    flat = torch.rand(n, 3, 1, 1, generator=g).expand(-1, -1, SIZE, SIZE) * (
        torch.rand(n, 1, 1, 1, generator=g) < 0.7
    )
    palette = PALETTE[torch.randint(0, len(PALETTE), (n,), generator=g)].view(n, 3, 1, 1)
    tinted = blotch[:, :1] * palette
    out = torch.where(kind == 0, uniform, gauss)
    out = torch.where(kind == 2, blotch, out)
    out = torch.where(kind == 3, flat, out)
    out = torch.where(kind == 4, tinted, out)
    return out.clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image 3×3 Gaussian blur with standard deviation `sigma` [N]."""
    d = torch.tensor([-1.0, 0.0, 1.0])
    k1 = torch.exp(-(d[None] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = k1[:, :, None] * k1[:, None, :]  # [N, 3, 3]
    n, c = x.shape[:2]
    weight = k2.repeat_interleave(c, 0).unsqueeze(1)  # [N·C, 1, 3, 3]
    out = F.conv2d(
        F.pad(x.reshape(1, n * c, SIZE, SIZE), (1, 1, 1, 1), mode="replicate"), weight, groups=n * c
    )
    return out.reshape(n, c, SIZE, SIZE)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Artefacts of generated images that must not change the score."""
    n = x.shape[0]

    def chance(p: float) -> torch.Tensor:
        return (torch.rand(n, 1, 1, 1, generator=g) < p).float()

    # specks of palette colours, smaller than the checker's minimum object area
    speck = torch.zeros(n, 1, SIZE, SIZE)
    for _ in range(3):
        ys, xs = torch.randint(0, SIZE - 1, (2, n), generator=g)
        side = torch.randint(1, 3, (n,), generator=g)
        for i in torch.nonzero(torch.rand(n, generator=g) < 0.15).flatten().tolist():
            speck[i, 0, ys[i] : ys[i] + side[i], xs[i] : xs[i] + side[i]] = 1
    colour = PALETTE[torch.randint(0, len(PALETTE), (n,), generator=g)].view(n, 3, 1, 1)
    empty = (x.sum(1, keepdim=True) == 0).float()
    x = x + speck * empty * colour
    # colour jitter: per-channel gain and offset, and a global one
    jitter = chance(0.8)
    gain = 1 + jitter * (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.3
    offset = jitter * (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.12
    x = x * gain + offset
    # blur
    blur = chance(0.35).flatten()
    sigma = 0.3 + torch.rand(n, generator=g) * 0.7
    x = torch.lerp(x, gaussian_blur(x, sigma), blur.view(n, 1, 1, 1))
    # blended smooth noise
    blend = chance(0.15) * torch.rand(n, 1, 1, 1, generator=g) * 0.3
    x = torch.lerp(x, smooth_noise(n, g), blend)
    # Gaussian noise of varying strength
    strength = chance(0.7) * torch.rand(n, 1, 1, 1, generator=g) * 0.2
    x = x + strength * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


def pick_negatives(labels: torch.Tensor, hard: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One false prompt per image: a hard negative where there is one (70%), else any."""
    noise = torch.rand(labels.shape, generator=g)
    any_negative = (noise + 2 * (1 - labels)).argmax(1)
    a_hard = (noise + 2 * hard).argmax(1)
    use_hard = (hard.sum(1) > 0) & (torch.rand(labels.shape[0], generator=g) < 0.7)
    return torch.where(use_hard, a_hard, any_negative)


def attack(
    model: ShapesClip,
    images: torch.Tensor,
    text: torch.Tensor,
    eps: torch.Tensor,
    steps: int,
    g: torch.Generator | None = None,
) -> torch.Tensor:
    """L∞ PGD that raises each image's logit for its (false) prompt embedding `text` [N, D]
    within `eps` ([N] or per pixel [N, 1, H, W]), kept too small to change any label."""
    eps = eps.view(-1, 1, 1, 1) if eps.dim() == 1 else eps
    delta = (torch.rand(images.shape, generator=g) * 2 - 1) * eps
    for _ in range(steps):
        delta.requires_grad_(True)
        x = (images + delta).clamp(0, 1)
        logit = (F.normalize(model.image(x), dim=-1) * text).sum()
        (grad,) = torch.autograd.grad(logit, delta)
        delta = delta.detach() + 1.5 * eps / steps * grad.sign()
        delta = torch.maximum(torch.minimum(delta, eps), -eps)
    return (images + delta).clamp(0, 1).detach()


def grouped_loss(logits: torch.Tensor, labels: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """Mean BCE of the positives + of the hard negatives + half of the other negatives."""
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    other = (1 - labels) * (1 - hard)
    loss = 0.5 * (bce * other).sum() / other.sum().clamp(min=1)
    for mask in (labels, hard):
        if mask.sum() > 0:
            loss = loss + (bce * mask).sum() / mask.sum()
    return loss


@torch.no_grad()
def validate(model: ShapesClip, per_category: int, seed: int, sigma: float = 0.0) -> dict:
    """Own prompt (positive) and hard negatives on scenes of fresh seeds; exact labels."""
    model.eval()
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    text = model.encode_texts(TEXTS)
    result: dict[str, dict] = {}
    all_scores, all_labels, all_pairs = [], [], []
    for category in CATEGORIES:
        pool = [s for s in SPECS if s.category == category]
        scores, labels, pair_wins = [], [], []
        specs = [pool[rng.integers(len(pool))] for _ in range(per_category)]
        seeds = VALID_SEED_BASE + rng.integers(VALID_SEED_BASE, size=per_category)
        objects = [layout(s, int(seed)) for s, seed in zip(specs, seeds, strict=True)]
        images = to_tensor(np.stack([render(o) for o in objects]))
        if sigma:
            images = (images + sigma * torch.randn(images.shape, generator=g)).clamp(0, 1)
        probs = torch.sigmoid(model.logits(model.encode_images(images), text))
        for row, spec, objs in zip(probs, specs, objects, strict=True):
            prompts = [spec, *hard_negatives(spec)]
            truth = [all(clauses(p, objs)) for p in prompts]
            assert truth[0], "a scene must satisfy its own prompt"
            s = [float(row[INDEX[p.text]]) for p in prompts]
            scores += s
            labels += truth
            pair_wins += [s[0] > sj for sj, tj in zip(s[1:], truth[1:], strict=True) if not tj]
        result[category] = _summary(scores, labels, pair_wins)
        all_scores += scores
        all_labels += labels
        all_pairs += pair_wins
    result["overall"] = _summary(all_scores, all_labels, all_pairs)
    noise = noise_images(256, g)
    noise_probs = torch.sigmoid(model.logits(model.encode_images(noise), text))
    result["noise_images"] = {
        "mean_score": float(noise_probs.mean()),
        "max_score": float(noise_probs.max()),
        "fraction_above_0.5": float((noise_probs > 0.5).float().mean()),
    }
    return result


def validate_attacks(
    model: ShapesClip, n: int, seed: int, eps: float, bg_eps: float | None = None, steps: int = 10
) -> dict:
    """PGD (L∞ `eps` on objects, `bg_eps` on the black background) towards one false hard
    negative per scene, and from black images towards a random prompt: how often the false
    prompt stays below 0.5."""
    bg_eps = eps if bg_eps is None else bg_eps
    model.eval()
    rng = np.random.default_rng(seed)
    specs = [SPECS[i] for i in rng.integers(len(SPECS), size=n)]
    objects = [layout(s, int(VALID_SEED_BASE + rng.integers(VALID_SEED_BASE))) for s in specs]
    images = to_tensor(np.stack([render(o) for o in objects]))
    targets = []
    for spec, objs in zip(specs, objects, strict=True):
        false = [h for h in hard_negatives(spec) if not all(clauses(h, objs))]
        targets.append(INDEX[false[rng.integers(len(false))].text])
    with torch.no_grad():
        text = model.encode_texts(TEXTS)
    out = {}
    for name, start, target in (
        ("scenes_to_hard_negative", images, torch.tensor(targets)),
        (
            "black_to_any_prompt",
            torch.zeros_like(images),
            torch.from_numpy(rng.integers(len(SPECS), size=n)),
        ),
    ):
        g = torch.Generator().manual_seed(seed)
        eps_map = torch.where(start.sum(1, keepdim=True) == 0, bg_eps, eps)
        adv = attack(model, start, text[target], eps_map, steps, g)
        with torch.no_grad():
            probs = torch.sigmoid(model.logits(model.encode_images(adv), text))
        p = probs[torch.arange(n), target]
        out[name] = {
            "still_below_0.5": round(float((p < 0.5).float().mean()), 4),
            "mean_score": round(float(p.mean()), 4),
        }
    return out


def _summary(scores: list[float], labels: list[bool], pair_wins: list[bool]) -> dict:
    s, t = np.array(scores), np.array(labels)
    correct = (s > 0.5) == t
    return {
        "accuracy": round(float(correct.mean()), 4),
        "positive_accuracy": round(float(correct[t].mean()), 4),
        "negative_accuracy": round(float(correct[~t].mean()), 4),
        "mean_positive": round(float(s[t].mean()), 4),
        "mean_negative": round(float(s[~t].mean()), 4),
        "positive_beats_negative": round(float(np.mean(pair_wins)), 4),
        "pairs": len(s),
    }


def print_table(title: str, result: dict) -> None:
    print(title)
    print(f"  {'category':10s}  acc    pos_acc neg_acc mean+  mean-  pos>neg")
    for name in (*CATEGORIES, "overall"):
        r = result[name]
        print(
            f"  {name:10s}  {r['accuracy']:.3f}  {r['positive_accuracy']:.3f}   "
            f"{r['negative_accuracy']:.3f}   {r['mean_positive']:.3f}  {r['mean_negative']:.3f}  "
            f"{r['positive_beats_negative']:.3f}"
        )
    print(f"  noise images: {result['noise_images']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=6.0, help="training loop wall time")
    parser.add_argument("--out", default="raydraft/assets/toy-clipscore")
    parser.add_argument("--pool", type=int, default=40_000, help="rendered training scenes")
    parser.add_argument("--batch", type=int, default=192)
    parser.add_argument("--noise-fraction", type=float, default=0.08)
    parser.add_argument("--mined", type=int, default=2, help="hardest negatives mined per image")
    parser.add_argument("--adv-fraction", type=float, default=0.25, help="of a batch, attacked")
    parser.add_argument("--adv-eps", type=float, default=0.1, help="largest L∞ attack on objects")
    parser.add_argument(
        "--adv-bg-eps", type=float, default=0.25, help="largest on black background (still black)"
    )
    parser.add_argument("--adv-steps", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    parser.add_argument("--valid-per-category", type=int, default=300)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    rng = np.random.default_rng(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    pool_images, pool_labels = make_pool(args.pool, rng)
    pool_images = torch.from_numpy(pool_images).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    pool_labels = torch.from_numpy(pool_labels).float()
    data_s = time.time() - start
    print(
        f"pool: {args.pool} scenes in {data_s:.0f} s; positives/scene "
        f"{pool_labels.sum(1).mean():.2f}"
    )

    model = ShapesClip(ClipConfig())
    print(f"parameters: {model.num_parameters():,}")
    flip, neighbours = flip_permutation(), neighbour_matrix()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    n_noise = round(args.batch * args.noise_fraction)
    n_real = args.batch - n_noise
    n_adv = round(args.batch * args.adv_fraction)
    log: list[dict] = []
    budget = args.minutes * 60
    train_start = time.time()
    step, next_eval = 0, budget / 4
    while (elapsed := time.time() - train_start) < budget:
        frac = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * frac))
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        idx = torch.randint(0, args.pool, (n_real,), generator=g)
        images = pool_images[idx].float() / 255
        labels = pool_labels[idx]
        flipped = torch.rand(n_real, generator=g) < 0.5
        images = torch.where(flipped.view(-1, 1, 1, 1), images.flip(-1), images)
        labels = torch.where(flipped.view(-1, 1), labels[:, flip], labels)
        background = torch.cat(
            [images.sum(1, keepdim=True) == 0, torch.ones(n_noise, 1, SIZE, SIZE, dtype=bool)]
        )
        images = torch.cat([augment(images, g), noise_images(n_noise, g)])
        labels = torch.cat([labels, torch.zeros(n_noise, len(SPECS))])
        hard = ((labels @ neighbours) > 0).float() * (1 - labels)
        if n_adv:  # the last n_adv images (the noise images among them) attacked
            with torch.no_grad():
                text = F.normalize(model.text(model.tokenize(TEXTS)), dim=-1)
            target = pick_negatives(labels[-n_adv:], hard[-n_adv:], g)
            strength = torch.rand(n_adv, 1, 1, 1, generator=g)
            eps = strength * torch.where(background[-n_adv:], args.adv_bg_eps, args.adv_eps)
            images[-n_adv:] = attack(model, images[-n_adv:], text[target], eps, args.adv_steps, g)
        logits = model.logits(
            F.normalize(model.image(images), dim=-1),
            F.normalize(model.text(model.tokenize(TEXTS)), dim=-1),
        )
        if args.mined:  # each image's highest-scoring negatives join the hard ones
            top = logits.detach().masked_fill(labels.bool(), -math.inf).topk(args.mined).indices
            hard = torch.maximum(hard, torch.zeros_like(hard).scatter_(1, top, 1.0))
        loss = grouped_loss(logits, labels, hard)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 50 == 0:
            print(
                f"step {step} {elapsed:.0f}s lr {lr:.2e} loss {loss.item():.4f} "
                f"scale {model.logit_scale.exp().item():.1f} bias {model.logit_bias.item():.2f}"
            )
        if elapsed > next_eval:
            next_eval += budget / 4
            quick = validate(model, 40, seed=1)["overall"]
            log.append({"step": step, "seconds": round(elapsed), "loss": loss.item(), **quick})
            print(f"  valid (quick) {quick}")
    train_s = time.time() - train_start

    model.eval()
    clean = validate(model, args.valid_per_category, seed=12345)
    noisy = validate(model, args.valid_per_category, seed=12345, sigma=0.1)
    print_table("validation, clean", clean)
    print_table("validation, Gaussian noise σ=0.1", noisy)
    attacks = {
        f"eps_{eps:.3f}_background_{bg:.3f}": validate_attacks(model, 300, 777, eps, bg)
        for eps, bg in ((4 / 255, 4 / 255), (0.05, 0.05), (0.1, 0.1), (0.05, 0.25))
    }
    print(f"attacks (PGD, 10 steps): {json.dumps(attacks, indent=1)}")
    save_clip(model, args.out)
    record = {
        "parameters": model.num_parameters(),
        "steps": step,
        "batch": args.batch,
        "pool": args.pool,
        "data_seconds": round(data_s, 1),
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - start, 1),
        "args": vars(args),
        "validation": {"clean": clean, "noise_sigma_0.1": noisy, "attacks": attacks},
        "progress": log,
    }
    (Path(args.out) / "train_log.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"saved to {args.out} ({step} steps, {train_s:.0f} s training)")


if __name__ == "__main__":
    main()
