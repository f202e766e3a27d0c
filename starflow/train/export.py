"""Sample grids and the final export of ``Trainer``, with the guards that keep a good export.

The export is the EMA model. It is refused (``TrainingError``, the previous ``model/`` left in place)
when its weights are not finite, when its loss on a fixed probe batch is not finite, or when that loss
is clearly worse than the loss of the model already exported in ``model/`` (computed now, on the same
probe batch). A new export is written into a temporary folder and swapped in, so a crash never leaves
half a model where a good one was."""
from __future__ import annotations

import math
import os
import shutil
import warnings
from dataclasses import asdict

import torch
import yaml

from starflow.errors import NonFiniteError, StarflowError, TrainingError
from starflow.io.hub import atomic_write_bytes, check_finite
from starflow.io.images import save_images
from starflow.train import distributed as dist_utils

# A new export is "worse" when its probe loss exceeds the previous one's by more than this (relative to
# its magnitude, with a floor): noise between nearby EMA states stays far below it, a diverged run does not.
WORSE_MARGIN, WORSE_FLOOR = 0.1, 0.05


class ExportMixin:
    """Needs the trainer's ``ema``, ``model``, ``model_class``, ``sharded``, ``dist``, ``cfg``, ``device``,
    ``preview``, ``pipeline()``, ``get_batch()`` and ``condition_fn``."""

    def _export_module(self) -> torch.nn.Module | None:
        """The EMA model as a plain module on rank 0 (None elsewhere). Under FSDP its shards are gathered
        (a collective every rank must enter)."""
        if not self.sharded:
            return self.ema.module if self.is_main else None
        full = dist_utils.full_state_on_rank0(self.ema.module)
        if not self.is_main:
            return None
        plain = self.model_class(self.model.config)
        plain.load_state_dict(full)
        return plain.to(self.device).eval()

    def save_samples(self) -> None:
        module = self._export_module()
        if self.is_main:
            pipe = self.pipeline(module)
            kwargs = dict(self.preview)
            n = len(kwargs["y"]) if "y" in kwargs else len(kwargs["prompt"]) if "prompt" in kwargs else 16
            if "y" in kwargs:
                kwargs["y"] = kwargs["y"].to(self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                images = pipe.sample(n, generator=torch.Generator(self.device).manual_seed(0), device=self.device, **kwargs)
            try:
                save_images(images, os.path.join(self.cfg.out_dir, "samples", f"step_{self.step:07d}.png"))
            except NonFiniteError as e:  # a preview is not worth stopping the run for; the log says why
                warnings.warn(f"step {self.step}: sample grid not written: {e}")
        self.model.train()
        dist_utils.barrier(self.dist)

    def probe_loss(self, module: torch.nn.Module) -> float:
        """Loss of ``module`` on a fixed batch (the examples of step 0, fixed randomness)."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed)
            x, y, _ = self.get_batch(0)[0]
            was_training = module.training
            module.eval()
            with torch.no_grad():
                loss = float(module.loss(x, **self.condition_fn(y)))
            module.train(was_training)
        return loss

    def _previous_export_loss(self, out: str) -> float | None:
        """Probe loss of the model already in ``out`` (None when there is none, or it is not comparable)."""
        model_dir = os.path.join(out, "model") if os.path.exists(os.path.join(out, "model_index.json")) else out
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            return None
        try:
            previous = self.model_class.from_pretrained(model_dir, map_location=self.device)
        except (StarflowError, ValueError, OSError, RuntimeError) as e:
            warnings.warn(f"the model already in {out} cannot be compared with this run's ({e}); replacing it")
            return None
        return self.probe_loss(previous)

    def _export_problem(self, module: torch.nn.Module, out: str) -> str | None:
        try:
            check_finite(module.state_dict(), f"EMA weights at step {self.step}")
        except NonFiniteError as e:
            return str(e)
        loss = self.probe_loss(module)
        if not math.isfinite(loss):
            return f"EMA model at step {self.step} has a non-finite loss ({loss}) on the probe batch"
        old = self._previous_export_loss(out)
        if old is not None and math.isfinite(old) and loss > old + max(WORSE_MARGIN * abs(old), WORSE_FLOOR):
            return (f"EMA model at step {self.step} is worse than the one already in {out} "
                    f"(probe loss {loss:.4f} vs {old:.4f})")
        return None

    def export(self) -> str:
        """Write the EMA model (pipeline folder) to ``out_dir/model``; ``TrainingError`` if it is refused."""
        out = os.path.join(self.cfg.out_dir, "model")
        module = self._export_module()
        problem = self._export_problem(module, out) if self.is_main else None
        problem = dist_utils.broadcast_object(problem, self.dist)
        if problem:
            kept = "the previous export is kept" if os.path.isdir(out) else "nothing exported"
            raise TrainingError(f"not exporting: {problem}; {kept}; checkpoints are in {self.ckpt_dir}")
        if self.is_main:
            staged, aside = out + ".tmp-export", out + ".old-export"
            shutil.rmtree(staged, ignore_errors=True)
            self.pipeline(module).save_pretrained(staged)
            atomic_write_bytes(os.path.join(staged, "train_config.yaml"),
                               yaml.safe_dump({"train": asdict(self.cfg)}, sort_keys=False).encode())
            if os.path.isdir(out):
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(out, aside)
            os.replace(staged, out)
            shutil.rmtree(aside, ignore_errors=True)
        dist_utils.barrier(self.dist)
        return out
