"""`toy-clipscore`: a tiny CLIP-like image–prompt match score for the shapes world. Differentiable.

Two towers meet in a SigLIP head: logit = scale·cos(image, text) + bias, and the score is
sigmoid(logit), the probability that the image shows the prompt.

    image  CNN on 32×32 RGB + 2 coordinate channels (4 convs, three of stride 2, down to 4×4),
           flattened (positions kept: prompts speak of left/right/above/below) -> MLP
    text   word embeddings + learned positions -> 2-layer pre-norm transformer -> the word slots
           concatenated (order-aware) -> linear

Weights ship in `raydraft/assets/toy-clipscore/` (config.json + model.safetensors), made by

    python -m raydraft.embedded.train_clipscore --minutes 6 --out raydraft/assets/toy-clipscore

which trains on exact labels from the layouts (`shapes_checker.clauses`) with hard negatives
from `hard_negatives`, augmentations that mimic generated-image artefacts and small PGD
attacks; its validation numbers are in `train_log.json` next to the weights. Images are
clamped to [0, 1] before scoring (no gain from leaving the range). Known limit: an
unbounded pixel-space attack (saturated colour noise, mean |Δ| ≈ 0.15) still buys a high
score without drawing the prompt, so judge a run tuned on this reward with `toy-geneval`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from raydraft.data.shapes import COLORS, NUMBERS, RELATIONS, SHAPES, PromptSpec, all_specs
from raydraft.rewards.registry import register_reward

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "assets" / "toy-clipscore"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAIN_COMMAND = (
    "python -m raydraft.embedded.train_clipscore --minutes 6 --out raydraft/assets/toy-clipscore"
)
PAD = "<pad>"


def vocabulary() -> list[str]:
    """The shapes grammar's words, padding first."""
    return [PAD, *sorted({w for s in all_specs() for w in s.text.split()})]


@dataclass
class ClipConfig:
    vocab: list[str] = field(default_factory=vocabulary)
    dim: int = 96  # shared embedding
    width: int = 32  # image channels (doubled after the first conv)
    hidden: int = 256  # image MLP
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_words: int = 8


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        w = cfg.width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()
            )

        self.convs = nn.Sequential(
            block(5, w, 1),  # 32×32
            block(w, 2 * w, 2),  # 16×16
            block(2 * w, 2 * w, 2),  # 8×8
            block(2 * w, 2 * w, 2),  # 4×4
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * w * 16, cfg.hidden),
            nn.SiLU(),
            nn.Linear(cfg.hidden, cfg.dim),
        )
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys])[None], persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        x = torch.cat([x, self.coords.to(x.dtype).expand(x.shape[0], -1, -1, -1)], dim=1)
        return self.head(self.convs(x))


class TextEncoder(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        d = cfg.text_width
        self.words = nn.Embedding(len(cfg.vocab), d, padding_idx=0)
        self.positions = nn.Parameter(torch.randn(cfg.max_words, d) * 0.5)
        layer = nn.TransformerEncoderLayer(
            d, cfg.text_heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        # pooled by position, not averaged: "a red circle and a blue square" must not read
        # as "a blue circle and a red square" (a mean-pooled encoder settles on bag of words)
        self.proj = nn.Linear(cfg.max_words * d, cfg.dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens == 0
        x = self.words(tokens) + self.positions[: tokens.shape[1]]
        x = self.norm(self.layers(x, src_key_padding_mask=pad))
        return self.proj((x * (~pad).unsqueeze(-1).to(x.dtype)).flatten(1))


class ShapesClip(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.index = {w: i for i, w in enumerate(cfg.vocab)}
        self.image = ImageEncoder(cfg)
        self.text = TextEncoder(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(2.3))  # log 10, as SigLIP
        self.logit_bias = nn.Parameter(torch.tensor(-5.0))

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        rows = []
        for prompt in prompts:
            words = prompt.lower().split()
            unknown = [w for w in words if w not in self.index]
            if unknown or not words or len(words) > self.cfg.max_words:
                raise ValueError(
                    f"toy-clipscore only reads prompts of the shapes world; {prompt!r} has "
                    f"unknown words {unknown}"
                    if unknown
                    else f"bad length: {prompt!r}"
                )
            ids = [self.index[w] for w in words]
            rows.append(ids + [0] * (self.cfg.max_words - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images), dim=-1)

    def encode_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenize(prompts).to(self.logit_bias.device)
        return F.normalize(self.text(tokens), dim=-1)

    def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """All pairs: [images, texts]."""
        return self.logit_scale.exp() * image_emb @ text_emb.T + self.logit_bias

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def save_clip(model: ShapesClip, out: str | Path) -> None:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(asdict(model.cfg), indent=1) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))


def load_clip(path: str | Path = DEFAULT_PATH) -> ShapesClip:
    from safetensors.torch import load_file

    path = Path(path)
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"toy-clipscore weights not found: {', '.join(str(path / f) for f in missing)}; "
            f"they are produced by `{TRAIN_COMMAND}`"
        )
    cfg = ClipConfig(**json.loads((path / CONFIG_FILE).read_text()))
    model = ShapesClip(cfg)
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    return model.eval().requires_grad_(False)


def hard_negatives(spec: PromptSpec) -> list[PromptSpec]:
    """Prompts of the grammar one edit away from `spec`: swap the two colours, change a
    colour, change a shape, swap the two shapes, change the count by ±1, change the relation.
    Some may still hold for a scene of `spec` ("a square and a circle"): label them exactly."""
    out: list[PromptSpec] = []
    n = len(spec.shapes)
    if n == 2 and None not in spec.colors:
        out.append(replace(spec, colors=spec.colors[::-1]))
    for i, color in enumerate(spec.colors):
        if color is not None:
            for other in COLORS:
                out.append(replace(spec, colors=_put(spec.colors, i, other)))
    if spec.category == "counting":
        for m in (n - 1, n + 1):
            if m in NUMBERS:
                out.append(replace(spec, shapes=spec.shapes[:1] * m, colors=(None,) * m))
        for shape in SHAPES:
            out.append(replace(spec, shapes=(shape,) * n))
    else:
        for i in range(n):
            for shape in SHAPES:
                out.append(replace(spec, shapes=_put(spec.shapes, i, shape)))
        if n == 2:
            out.append(replace(spec, shapes=spec.shapes[::-1]))
    if spec.category == "single":
        out.append(PromptSpec("counting", spec.shapes * 2, (None, None)))
    if spec.relation:
        out += [replace(spec, relation=r) for r in RELATIONS]
    unique = {s.text: s for s in out if s.text in _GRAMMAR and s.text != spec.text}
    return [_GRAMMAR[t] for t in unique]


def _put(values: tuple, i: int, value) -> tuple:
    return (*values[:i], value, *values[i + 1 :])


_GRAMMAR = {s.text: s for s in all_specs()}


@register_reward("toy-clipscore")
class ShapesClipScore:
    """sigmoid(scale·cos(image, prompt) + bias) in (0, 1): the probability that the image
    shows the prompt. Gradients flow to the images; the model itself is frozen."""

    differentiable = True

    def __init__(self, path: str | None = None) -> None:
        self.name = "toy-clipscore"
        self.model = load_clip(path if path is not None else DEFAULT_PATH)
        self._text_cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _texts(self, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if (p, device) not in self._text_cache]
        if new:
            with torch.no_grad():
                emb = self.model.encode_texts(new)
            for p, e in zip(new, emb.to(device), strict=True):
                self._text_cache[(p, device)] = e
        return torch.stack([self._text_cache[(p, device)] for p in prompts])

    def score(self, images, prompts, metadata) -> torch.Tensor:
        if self.model.logit_bias.device != images.device:
            self.model.to(images.device)
            self._text_cache.clear()
        text = self._texts(prompts, images.device)
        image = self.model.encode_images(images.float().clamp(0, 1))
        logits = self.model.logit_scale.exp() * (image * text).sum(-1) + self.model.logit_bias
        return torch.sigmoid(logits)
