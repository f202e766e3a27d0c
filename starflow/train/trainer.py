"""The training loop shared by every model family: anything with ``loss(x, y)`` trains here.

Exact resume: the batch order of each epoch is a permutation drawn from (seed, epoch), and every
step re-seeds the global RNG from (seed, step), so step N sees the same batch, dequantisation noise
and condition dropout whether or not the run was interrupted before it.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict

import torch
import yaml
from tqdm import tqdm

from starflow.config import TrainConfig
from starflow.images import dequantize, save_images
from starflow.train import checkpoint as ckpt
from starflow.train.ema import make_ema


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it (auto), or when asked for; fp32 otherwise."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, model: torch.nn.Module, dataset, cfg: TrainConfig, condition_fn=None, preview=None,
                 pipeline_factory=None):
        """``condition_fn(labels) -> kwargs`` for ``model.loss`` (default: class labels when the model has
        classes); ``preview``: kwargs for the sample grids (e.g. ``{"y": ...}`` or ``{"prompt": [...]}``);
        ``pipeline_factory(model) -> StarflowPipeline`` wraps the EMA model for previews and export."""
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.dataset = dataset
        self.condition_fn = condition_fn or self._default_condition
        self.preview = preview if preview is not None else self._default_preview()
        self.pipeline_factory = pipeline_factory
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.ema = make_ema(self.model, cfg.ema_decay)
        self.step = 0
        self.lr_scale = 1.0  # lowered after a rollback
        if len(dataset) < cfg.batch_size:
            raise ValueError(f"dataset has {len(dataset)} examples, fewer than batch_size {cfg.batch_size}")
        self.steps_per_epoch = len(dataset) // cfg.batch_size
        self.ckpt_dir = os.path.join(cfg.out_dir, "checkpoints")
        self.log_path = os.path.join(cfg.out_dir, "log.jsonl")

    def _default_condition(self, y: torch.Tensor) -> dict:
        return {"y": y} if getattr(self.model.config, "num_classes", 0) else {}

    def _default_preview(self) -> dict:
        k = getattr(self.model.config, "num_classes", 0)
        return {"y": torch.arange(16) % k} if k else {}

    def pipeline(self, model):
        from starflow.pipeline import StarflowPipeline

        return self.pipeline_factory(model) if self.pipeline_factory else StarflowPipeline(model)

    # ---- data ------------------------------------------------------------------------------
    def batch_indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch))
        return perm[i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size]

    def get_batch(self, step: int):
        idx = self.batch_indices(step)
        if hasattr(self.dataset, "get_batch"):
            x, y = self.dataset.get_batch(idx)
        else:
            items = [self.dataset[int(i)] for i in idx]
            x = torch.stack([it[0] for it in items])
            y = torch.stack([torch.as_tensor(it[1]) for it in items])
        x = x.to(self.device)
        x = dequantize(x) if x.dtype == torch.uint8 else x.float()
        if self.cfg.noise_std > 0:
            x = x + self.cfg.noise_std * torch.randn_like(x)
        return x, y.to(self.device)

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self) -> str:
        opt_tensors, opt_rest = ckpt.flatten_optimizer(self.opt.state_dict())
        info = {"lr_scale": self.lr_scale, "optimizer": opt_rest, "train_config": asdict(self.cfg)}
        return ckpt.save_checkpoint(self.ckpt_dir, self.step,
                                    {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": opt_tensors},
                                    info, self.cfg.keep_last)

    def load(self, path: str) -> None:
        manifest, tensors = ckpt.load_checkpoint(path)
        self.model.load_state_dict(tensors["model"])
        self.ema.load_state_dict(tensors["ema"])
        self.opt.load_state_dict(ckpt.unflatten_optimizer(tensors["optimizer"], manifest["optimizer"]))
        self.step = manifest["step"]
        self.lr_scale = manifest.get("lr_scale", 1.0)

    def resume(self, resume: str | None) -> None:
        if not resume:
            return
        path = ckpt.latest_valid(self.ckpt_dir) if resume == "auto" else resume
        if path is None:
            print(f"no valid checkpoint under {self.ckpt_dir}; starting from step 0", file=sys.stderr)
            return
        self.load(path)
        print(f"resumed from {path} at step {self.step}", file=sys.stderr)

    # ---- logging & samples -------------------------------------------------------------------
    def log(self, record: dict) -> None:
        os.makedirs(self.cfg.out_dir, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save_samples(self) -> None:
        pipe = self.pipeline(self.ema.module)
        kwargs = dict(self.preview)
        n = len(kwargs["y"]) if "y" in kwargs else len(kwargs["prompt"]) if "prompt" in kwargs else 16
        if "y" in kwargs:
            kwargs["y"] = kwargs["y"].to(self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            images = pipe.sample(n, generator=torch.Generator(self.device).manual_seed(0), device=self.device, **kwargs)
        self.model.train()
        save_images(images, os.path.join(self.cfg.out_dir, "samples", f"step_{self.step:07d}.png"))

    def export(self) -> str:
        out = os.path.join(self.cfg.out_dir, "model")
        self.pipeline(self.ema.module).save_pretrained(out)
        with open(os.path.join(out, "train_config.yaml"), "w") as f:
            yaml.safe_dump({"train": asdict(self.cfg)}, f, sort_keys=False)
        return out

    # ---- the loop ----------------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        torch.manual_seed(self.cfg.seed * 1_000_003 + step)
        x, y = self.get_batch(step)
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.lr * lr_factor(step, self.cfg) * self.lr_scale
        self.model.train()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss = self.model.loss(x, **self.condition_fn(y))
        if not torch.isfinite(loss):
            self.opt.zero_grad(set_to_none=True)
            return {"skipped": f"non-finite loss {loss.item()}"}
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if not torch.isfinite(grad_norm):
            self.opt.zero_grad(set_to_none=True)
            return {"skipped": f"non-finite gradient norm {grad_norm.item()}"}
        self.opt.step()
        self.ema.update_parameters(self.model)
        return {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": self.opt.param_groups[0]["lr"]}

    def train(self, resume: str | None = None) -> str:
        self.resume(resume)
        cfg = self.cfg
        bad_in_a_row = 0
        t0, seen = time.time(), 0
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not sys.stderr.isatty(), dynamic_ncols=True)
        while self.step < cfg.steps:
            rec = self.train_step(self.step)
            if "skipped" in rec:
                bad_in_a_row += 1
                warnings.warn(f"step {self.step}: skipped ({rec['skipped']}); {bad_in_a_row} in a row")
                self.log({"step": self.step, "event": "skipped", "reason": rec["skipped"]})
                if bad_in_a_row >= cfg.max_nonfinite_in_a_row:
                    self.rollback()
                    bad_in_a_row = 0
                    continue
                self.step += 1
                continue
            bad_in_a_row = 0
            self.step += 1
            seen += cfg.batch_size
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                dt = time.time() - t0
                rec.update(step=self.step, images_per_s=seen / dt if dt > 0 else float("nan"), time=time.time())
                self.log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", ips=f"{rec['images_per_s']:.0f}")
                t0, seen = time.time(), 0
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save()
            if self.step % cfg.sample_every == 0 or self.step == cfg.steps:
                self.save_samples()
        bar.close()
        return self.export()

    def rollback(self) -> None:
        path = ckpt.latest_valid(self.ckpt_dir)
        if path is None:
            raise RuntimeError(f"{self.cfg.max_nonfinite_in_a_row} non-finite steps in a row and no checkpoint to roll back to")
        lr_scale = self.lr_scale * 0.5
        self.load(path)
        self.lr_scale = lr_scale
        warnings.warn(f"rolled back to {path} (step {self.step}) with learning rate x{self.lr_scale}")
        self.log({"step": self.step, "event": "rollback", "checkpoint": path, "lr_scale": self.lr_scale})
