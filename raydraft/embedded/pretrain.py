"""Pretrain the embedded toy model on the shapes world with rectified flow.

Run once; the weights ship in `raydraft/assets/toy-model/`, so users never pay for it:

    python -m raydraft.embedded.pretrain --steps 3000 --out raydraft/assets/toy-model

The run is deterministic in its seed and step count (not wall time), so the command
regenerates the shipped weights wherever it runs. `--ship-base-table toy-nft` then ships
the default config's base evaluation (`raydraft.evaluation_cache`), which must be redone
whenever the code it depends on changes (tests/test_embedded.py says so).

x_t = (1 - t)·x0 + t·ε with t logit-normal, target v = ε - x0; AdamW 1e-3 with warm-up,
gradient clipping 1.0, batch 64, EMA 0.999 with warm-up (the EMA weights are saved).
10% of prompts are dropped to "" so classifier-free guidance is available. Training
prompts come from the train split only; categories are sampled uniformly. The base is
meant to stay imperfect.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raydraft.build import build_policy, eval_sampler
from raydraft.config import LoraConfig, ModelConfig, load_config
from raydraft.data.shapes import CATEGORIES, all_specs, sample_scenes, split_specs
from raydraft.evaluation import EVAL_BATCH, evaluate
from raydraft.evaluation_cache import SHIPPED as SHIPPED_TABLES
from raydraft.evaluation_cache import evaluation_key, store_table
from raydraft.models.flow_schedule import flow_sigmas
from raydraft.models.toy import ToyPolicy, build_toy_components, save_toy_model
from raydraft.sampling.samplers import FlowSampler

CFG_DROPOUT = 0.1
EMA_DECAY = 0.999


def vocabulary() -> list[str]:
    return sorted({w for s in all_specs() for w in s.text.split()})


class BatchSource:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        train = split_specs("train")
        self.by_category = {c: [s for s in train if s.category == c] for c in CATEGORIES}

    def __call__(self, batch: int) -> tuple[torch.Tensor, list[str]]:
        specs = []
        for category in self.rng.choice(CATEGORIES, size=batch):
            pool = self.by_category[category]
            specs.append(pool[self.rng.integers(len(pool))])
        seeds = self.rng.integers(0, 2**31, size=batch).tolist()
        images = sample_scenes(specs, seeds) * 2 - 1
        prompts = ["" if self.rng.random() < CFG_DROPOUT else s.text for s in specs]
        return images, prompts


RECORD = {"steps": 10, "guidance": 1.0, "per_category": 4}


def record_base_eval(model_dir: Path) -> dict:
    """Evaluate a saved model on a small fixed subset; tests check it reproduces."""
    policy = ToyPolicy.from_pretrained(
        ModelConfig(path=str(model_dir), lora=LoraConfig(enabled=False))
    )
    sampler = FlowSampler(flow_sigmas(RECORD["steps"]), "ode")
    table = evaluate(policy, sampler, RECORD["guidance"], RECORD["per_category"])
    record = {**RECORD, "table": table}
    (model_dir / "base_eval.json").write_text(json.dumps(record, indent=1))
    return record


def base_evaluation(config: str | None) -> tuple[str, Callable[[], dict]]:
    """The key of the base table of `config`'s model (`raydraft.evaluation_cache`), and
    the evaluation that computes it."""
    cfg = load_config(config, [])
    policy = build_policy(cfg.model)
    policy.train(False)
    sampler = eval_sampler(cfg, policy)
    guidance, per_category = cfg.sampler.guidance_scale, cfg.logging.eval_per_category
    key = evaluation_key(policy, sampler, guidance, per_category, EVAL_BATCH)
    return key, lambda: evaluate(policy, sampler, guidance, per_category, EVAL_BATCH)


def ship_base_table(config: str) -> tuple[Path, dict]:
    """The base table of `config`'s model, shipped with the package under its key: runs of
    that config start without evaluating it."""
    key, evaluation = base_evaluation(config)
    table = evaluation()
    return store_table(key, table, SHIPPED_TABLES), table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", default="raydraft/assets/toy-model")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=500, help="steps between evaluations")
    parser.add_argument("--snapshots", help="also save the EMA model at every evaluation here")
    parser.add_argument("--record-eval", metavar="MODEL_DIR", help="only write base_eval.json")
    parser.add_argument("--ship-base-table", metavar="CONFIG", help="only ship CONFIG's base table")
    args = parser.parse_args()
    if args.record_eval:
        print(json.dumps(record_base_eval(Path(args.record_eval))["table"]["overall"]))
        return
    if args.ship_base_table:
        path, table = ship_base_table(args.ship_base_table)
        print(path, json.dumps(table["overall"]))
        return

    torch.manual_seed(args.seed)
    unet, text_encoder, tokenizer = build_toy_components(args.seed, vocabulary())
    text_encoder.train()
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 200))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = [*ema_unet.parameters(), *ema_text.parameters()]
    source = BatchSource(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    cfg = ModelConfig(lora=LoraConfig(enabled=False))
    sampler = FlowSampler(flow_sigmas(10), "ode")
    log = []

    start = time.time()
    for step in range(1, args.steps + 1):
        x0, prompts = source(args.batch)
        ids = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt")
        embeds = text_encoder(ids.input_ids).last_hidden_state
        t = torch.sigmoid(torch.randn(args.batch, generator=generator))
        eps = torch.randn(x0.shape, generator=generator)
        tb = t.view(-1, 1, 1, 1)
        xt = (1 - tb) * x0 + tb * eps
        out = unet(F.pixel_unshuffle(xt, 2), t * 1000, encoder_hidden_states=embeds).sample
        loss = F.mse_loss(F.pixel_shuffle(out, 2), eps - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        warmup.step()
        # EMA with warm-up (as diffusers' EMAModel): a flat 0.999 would still hold 37% of
        # the random initialisation after 1000 steps.
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema_params, params, strict=True):
                e.lerp_(p, 1 - decay)
        if step % args.eval_every == 0 or step == args.steps:
            policy = ToyPolicy(copy.deepcopy(ema_unet), ema_text, tokenizer, cfg)
            table = evaluate(policy, sampler, 1.0, per_category=16)
            row = {
                "minutes": round((time.time() - start) / 60, 1),
                "step": step,
                "loss": float(loss.detach()),
                **{c: round(table[c]["strict"], 3) for c in table},
            }
            log.append(row)
            print(json.dumps(row), flush=True)
            if args.snapshots:
                save_toy_model(
                    Path(args.snapshots) / f"step-{step:06d}", ema_unet, ema_text, tokenizer
                )
    out = Path(args.out)
    save_toy_model(out, ema_unet, ema_text, tokenizer)
    (out / "pretrain_log.json").write_text(json.dumps({"args": vars(args), "log": log}, indent=1))
    record_base_eval(out)
    print(f"saved {out} after {step} steps", flush=True)


if __name__ == "__main__":
    main()
