"""`raydraft bench rewards`: each reward model in this process against the same reward as a
Ray Serve deployment, at the same batch size and thread count, measured side by side.

Images/s of `score` in process, and through a `RemoteReward` (the rollout workers' client:
chunks of `images_per_request` to the deployment's `@serve.batch`), and their ratio. The
CLIP rewards run on random weights of `size=small` (a CPU) or `size=full` (PickScore's
ViT-H/14 and HPSv2's, CLIPScore's and the aesthetic predictor's ViT-L/14, ImageReward's
BLIP, for a GPU); OCR runs on its real shipped weights, on rendered text.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image, ImageDraw, ImageFont
from ray import serve

from raydraft.bench.machine import describe
from raydraft.bench.options import parse_options
from raydraft.bench.reward_models import (
    CLIP_SIZES,
    save_aesthetic_mlp,
    save_clip,
    save_imagereward,
)
from raydraft.bench.timing import median_seconds
from raydraft.config import RewardsConfig, RewardServingConfig
from raydraft.rewards.registry import build_reward
from raydraft_ray.cluster import connect
from raydraft_ray.reward_serving import deploy_rewards, remote_reward

DEFAULTS = {
    "rewards": "pickscore,clipscore,aesthetic,hpsv2,imagereward,ocr",
    "size": "small",
    "batch": 8,
    "side": 512,
    "repeats": 3,
    "threads": 1,
    "device": "cpu",
}
BACKBONE = {"pickscore": "vit-h", "clipscore": "vit-l", "aesthetic": "vit-l", "hpsv2": "vit-h"}


def component(name: str, size: str, device: str, root: Path) -> dict:
    """The reward's config entry, its weights written under `root` when it needs any."""
    if name == "ocr":
        return {"name": "ocr"}
    if name == "imagereward":
        path = save_imagereward(root / name, "full" if size == "full" else "small")
        return {"name": name, "options": {"path": path, "device": device}}
    clip = save_clip(root / name, BACKBONE[name] if size == "full" else "small")
    options = {"path": clip, "device": device}
    if name == "aesthetic":
        width = CLIP_SIZES[BACKBONE[name] if size == "full" else "small"][-1]
        options["mlp_path"] = save_aesthetic_mlp(root / "aesthetic-mlp.pth", width)
    return {"name": name, "options": options}


def text_images(batch: int, side: int) -> tuple[torch.Tensor, list[str]]:
    """Rendered words on white (what OCR must read), with prompts quoting them."""
    words = [f"sign {i}" for i in range(batch)]
    font = ImageFont.load_default(size=side // 8)
    arrays = []
    for word in words:
        image = Image.new("RGB", (side, side), "white")
        ImageDraw.Draw(image).text((side // 2, side // 2), word, fill="black", font=font,
                                   anchor="mm")  # fmt: skip
        arrays.append(np.asarray(image, dtype=np.float32) / 255)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, [f'a sign that says "{word}"' for word in words]


def run(options: list[str]) -> None:
    opts = parse_options("rewards", options, DEFAULTS)
    batch, threads, repeats = opts["batch"], opts["threads"], opts["repeats"]
    torch.set_num_threads(threads)
    connect(None, num_cpus=max(4, 2 * threads))
    # One replica with this process's thread count, the whole batch in one chunk.
    serving = RewardServingConfig(
        num_cpus=threads, num_gpus=1.0 if opts["device"] == "cuda" else 0.0,
        max_batch_size=1, images_per_request=batch,
    )  # fmt: skip
    images, prompts = text_images(batch, opts["side"])
    metadata = [{} for _ in prompts]
    print(f"# raydraft bench rewards: {describe(opts['device'])}, ray {ray.__version__}, "
          f"{opts['size']} models, batch {batch} of {opts['side']}x{opts['side']}, "
          f"{threads} thread(s) each side")  # fmt: skip
    print("| reward | in process, images/s | through Serve, images/s | Serve / in process |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as root:
        for name in opts["rewards"].split(","):
            spec = component(name, opts["size"], opts["device"], Path(root))
            cfg = RewardsConfig(components=[spec])
            local = build_reward(cfg)
            here = median_seconds(
                lambda r=local: r.score(images, prompts, metadata), repeats, warm_up=True
            )
            apps = deploy_rewards(cfg, serving, 300)
            try:
                served = remote_reward(cfg, serving)
                there = median_seconds(
                    lambda r=served: r.score(images, prompts, metadata), repeats, warm_up=True
                )
            finally:
                for app in apps.values():
                    serve.delete(app)
            print(f"| {name} | {batch / here:.2f} | {batch / there:.2f} | {here / there:.3f} |")
