"""How to train: the trainer's config (data, optimisation, checkpoints, precision, distribution).

Every field is validated where the config is built, with a message that names the field (the shared
checks are in ``starflow.schema``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from starflow.errors import ConfigError
from starflow.schema import check_types, is_number, require


@dataclass
class TrainConfig:
    dataset: str = "mnist"            # mnist | digits | shapes | shapes-edit | folder:PATH
    image_size: int | None = None     # folder and shapes datasets
    channels: int = 1                 # folder datasets only
    dataset_size: int = 10000         # generated examples: shapes scenes, or shapes-edit triples
    scene_categories: list | None = None  # shapes only: the caption categories scene i cycles through (repeat
                                      # one to weight it); null = all six, balanced
    autoencoder: str | None = None    # latent training: a shipped name (mnist, shapes) or a diffusers VAE folder
    decoder: str | None = None        # autoencoder to ship for decoding (e.g. mnist_ft, a fine-tuned decoder)
    text_encoder: str | None = None   # text-conditional training: "minilm" or a transformers folder
    init_from: str | None = None      # fine-tune: the saved model (folder or shipped name) whose weights start the run
    out_dir: str = "runs/mnist"
    steps: int = 2000
    batch_size: int = 64              # the global batch: split over ranks and accumulation micro-steps
    lr: float = 1e-3
    weight_decay: float = 1e-4
    input_spline_lr_mult: float = 30.0  # the input spline's few logits learn at this multiple of lr, no weight decay
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True           # decay min(ema_decay, (1+n)/(10+n)) after n updates; false: ema_decay from the start
    noise_std: float = 0.0            # extra Gaussian noise on [-1,1] pixels (TARFlow's augmentation); 0 = only dequantise
    shift_augment: int = 0            # > 0: add copies of every image shifted by up to this many pixels (labelled sets)
    seed: int = 0
    log_every: int = 25
    ckpt_every: int = 500
    sample_every: int = 500
    keep_last: int = 3
    num_workers: int = 0
    precision: str = "auto"           # auto | fp32 | bf16
    device: str = "auto"
    max_nonfinite_in_a_row: int = 5
    max_rollbacks: int = 3            # rollbacks without a checkpoint saved in between before the run stops
    distributed: str = "ddp"          # under torchrun: ddp (replicated) | fsdp (fully sharded, FSDP2)
    grad_accum_steps: int = 1         # micro-steps per optimizer step (batch_size / (world * this) each)
    grad_checkpointing: bool = False  # recompute each transformer layer in backward (less memory, ~1.3x compute)
    ddp_find_unused_parameters: bool = False  # DDP only: for models with parameters a step may not use

    def __post_init__(self):
        check_types(self)  # types first, so the range checks below never compare a string with a number
        for name in ("dataset", "out_dir", "precision", "device", "distributed"):
            value = getattr(self, name)
            require(value.strip() != "", name, f"must be a non-empty string, got {value!r}")
        for name in ("autoencoder", "decoder", "text_encoder", "init_from"):
            value = getattr(self, name)
            require(value is None or value.strip() != "", name, f"must be a non-empty string or null, got {value!r}")
        for name in ("lr", "weight_decay", "min_lr_ratio", "grad_clip", "ema_decay", "noise_std"):
            setattr(self, name, float(getattr(self, name)))
        require(len(self.betas) == 2 and all(is_number(b) and math.isfinite(b) for b in self.betas),
                "betas", f"must be two numbers, got {self.betas!r}")
        self.betas = tuple(float(b) for b in self.betas)
        require(all(0.0 <= b < 1.0 for b in self.betas), "betas", f"each must be in [0, 1), got {self.betas}")

        # Ranges.
        for name in ("steps", "batch_size", "log_every", "ckpt_every", "sample_every", "keep_last",
                     "dataset_size", "channels", "max_nonfinite_in_a_row", "grad_accum_steps", "max_rollbacks"):
            require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        require(self.image_size is None or self.image_size > 0, "image_size", f"must be positive, got {self.image_size}")
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(0 <= self.seed < 2**31, "seed", f"must be in [0, 2**31), got {self.seed}")
        require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        require(self.input_spline_lr_mult > 0, "input_spline_lr_mult", f"must be positive, got {self.input_spline_lr_mult}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(self.grad_clip > 0, "grad_clip", f"must be positive, got {self.grad_clip}")
        require(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        require(self.noise_std >= 0, "noise_std", f"must be >= 0, got {self.noise_std}")
        require(0 <= self.shift_augment <= 4, "shift_augment", f"must be in [0, 4] pixels, got {self.shift_augment}")
        require(self.precision in ("auto", "fp32", "bf16"), "precision", f"expected auto|fp32|bf16, got {self.precision!r}")
        require(self.distributed in ("ddp", "fsdp"), "distributed", f"expected ddp|fsdp, got {self.distributed!r}")
        require(self.batch_size % self.grad_accum_steps == 0, "grad_accum_steps",
               f"batch_size {self.batch_size} is not divisible by grad_accum_steps {self.grad_accum_steps}")
        require(self.dataset in ("mnist", "digits", "shapes", "shapes-edit") or
               (self.dataset.startswith("folder:") and len(self.dataset) > len("folder:")), "dataset",
               f"expected mnist, digits, shapes, shapes-edit or folder:PATH, got {self.dataset!r}")
        require(not self.dataset.startswith("folder:") or self.image_size is not None, "image_size",
               "a folder dataset needs image_size")
        if self.scene_categories is not None:
            from starflow.data.shapes_specs import CATEGORIES  # lazy: the shapes vocabulary only when asked for

            require(self.dataset == "shapes", "scene_categories", f"is for the shapes dataset, not {self.dataset!r}")
            require(len(self.scene_categories) > 0, "scene_categories", "must not be empty (null = all, balanced)")
            unknown = [c for c in self.scene_categories if c not in CATEGORIES]
            require(not unknown, "scene_categories", f"unknown {unknown}; expected names from {list(CATEGORIES)}")
            self.scene_categories = list(self.scene_categories)
        require(self.decoder is None or self.autoencoder is not None, "decoder", "needs train.autoencoder (latent training)")
        if self.device != "auto":
            try:
                import torch

                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ConfigError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}") from None
