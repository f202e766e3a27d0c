"""The training loop shared by every model family: anything with ``loss(x, y)`` trains here.

Exact resume: the batch order of each epoch is a permutation drawn from (seed, epoch), and every
step re-seeds the global RNG from (seed, step), so step N sees the same batch, dequantisation noise
and condition dropout whether or not the run was interrupted before it.

Data parallel (``torchrun``, see docs/training_on_many_gpus.md): ``batch_size`` is the *global* batch.
Every rank draws the randomness of the whole global batch (dequantisation noise, noise augmentation,
the condition-dropout mask of every conditional model, handed to its loss on the ``Condition``) from
the same seed and keeps its slice, then splits its slice into ``grad_accum_steps`` micro-batches. The
per-example randomness is therefore the same for any world size and accumulation, and so is the
averaged gradient up to float summation order (the peers' timesteps and noise, which they draw
themselves, excepted). Rank 0 alone logs, writes sample grids, checkpoints and exports.

Fault handling: SIGTERM/SIGINT ask the loop to stop; all ranks agree on it at the next step, save a
checkpoint of the step reached and raise ``TrainingInterrupted``. Checkpoints are atomic and
checksummed (checkpoint.py); ``resume="auto"`` removes half-written temp folders and skips (and
quarantines) corrupt ones. A non-finite loss or gradient skips the step; K in a row roll back to the
last good checkpoint with the learning rate halved, and ``max_rollbacks`` rollbacks without a checkpoint
saved in between stop the run with ``TrainingError`` (a NaN that comes from the data never goes away). A
run that ends inside a streak of skipped steps is not exported (export.py guards the export itself).
An exclusive lock on ``out_dir/train.lock`` keeps a second trainer out of the same folder.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict

import torch

from starflow.train.config import TrainConfig
from starflow.errors import TrainingError, as_output_error, check_output_dir
from starflow.train import checkpoint as ckpt
from starflow.train import distributed as dist_utils
from starflow.train.batches import BatchMixin
from starflow.train.ema import make_ema, warmup_decay
from starflow.train.export import ExportMixin
from starflow.train.progress import Progress
from starflow.train.schedule import warmup_cosine


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
    return warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)


def _param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """One AdamW group, or two when the model has an input spline: its handful of bin logits must move by
    units in a few hundred steps, so they get ``input_spline_lr_mult`` times the schedule's lr and no weight
    decay (which would pull them back to the identity)."""
    spline = [p for n, p in model.named_parameters() if n.startswith("input_spline.")]
    if not spline:
        return [{"params": list(model.parameters())}]
    rest = [p for n, p in model.named_parameters() if not n.startswith("input_spline.")]
    return [{"params": rest}, {"params": spline, "lr_mult": cfg.input_spline_lr_mult, "weight_decay": 0.0}]


class TrainingInterrupted(Exception):
    """Raised by ``Trainer.train`` after a SIGTERM/SIGINT, once the checkpoint of the step reached is saved."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {checkpoint}")


def _rank_seed(seed: int, rank: int) -> int:
    """Seed for randomness a model draws itself (the peers' timesteps and noise): rank 0 keeps the run's
    seed, others get their own."""
    return seed if rank == 0 else (seed + rank * 0x9E3779B97F4A7C15) % (1 << 63)


class Trainer(BatchMixin, ExportMixin):
    def __init__(self, model: torch.nn.Module, dataset, cfg: TrainConfig, condition_fn=None, preview=None,
                 pipeline_factory=None):
        """``condition_fn(labels) -> kwargs`` for ``model.loss`` (default: class labels when the model has
        classes); ``preview``: kwargs for the sample grids (e.g. ``{"y": ...}`` or ``{"prompt": [...]}``);
        ``pipeline_factory(model) -> StarflowPipeline`` wraps the EMA model for previews and export.

        Under ``torchrun`` (WORLD_SIZE > 1) this joins the process group and wraps the model in DDP or
        FSDP (``cfg.distributed``); every rank must build the same model and dataset."""
        self.cfg = cfg
        self.dist, self.device = dist_utils.init_distributed(cfg.device)
        W, A = self.dist.world_size, cfg.grad_accum_steps
        if cfg.batch_size % (W * A):
            raise ValueError(f"train.batch_size {cfg.batch_size} (the global batch) must be divisible by "
                             f"world size {W} x train.grad_accum_steps {A}")
        self.micro_batch = cfg.batch_size // (W * A)
        if len(dataset) < cfg.batch_size:
            raise ValueError(f"dataset has {len(dataset)} examples, fewer than batch_size {cfg.batch_size}")
        self.model_class = type(model)
        self.model = model.to(self.device)
        self.dataset = dataset
        self.condition_fn = condition_fn or self._default_condition
        self.preview = preview if preview is not None else self._default_preview()
        self.pipeline_factory = pipeline_factory
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        if cfg.grad_checkpointing:
            layers = [m for m in self.model.modules() if hasattr(m, "gradient_checkpointing")]
            if not layers:
                raise ValueError(f"train.grad_checkpointing: {type(model).__name__} has no block that supports it")
            for m in layers:
                m.gradient_checkpointing = True
        if self.dist.enabled:  # one starting point for every rank, whatever each one's init drew
            with torch.no_grad():
                for t in list(self.model.parameters()) + list(self.model.buffers()):
                    torch.distributed.broadcast(t, src=0)
        self.sharded = self.dist.enabled and cfg.distributed == "fsdp"
        self.ema = make_ema(self.model, cfg.ema_decay, warmup=cfg.ema_warmup)
        self.wrapped = dist_utils.wrap(self.model, cfg.distributed, self.dist, self.device,
                                       cfg.ddp_find_unused_parameters)
        if self.sharded:
            dist_utils.shard_fully(self.ema.module, self.dist, self.device)
        self.opt = torch.optim.AdamW(_param_groups(self.model, cfg), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.step = 0
        self.lr_scale = 1.0  # lowered after a rollback
        # A bucketed dataset plans its own batches (one aspect ratio each); others are shuffled whole.
        self.steps_per_epoch = dataset.num_batches(cfg.batch_size) if hasattr(dataset, "num_batches") \
            else len(dataset) // cfg.batch_size
        self.ckpt_dir = os.path.join(cfg.out_dir, "checkpoints")
        self.log_path = os.path.join(cfg.out_dir, "log.jsonl")
        self._signal: int | None = None      # set by the SIGTERM/SIGINT handler
        self._stop_agreed = False            # every rank has seen a stop request (set in train_step)
        self._last_saved: int | None = None
        self._rollbacks = 0                  # rollbacks since the last checkpoint saved

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def _default_condition(self, y: torch.Tensor) -> dict:
        return {"y": y} if getattr(self.model.config, "num_classes", 0) else {}

    def _default_preview(self) -> dict:
        k = getattr(self.model.config, "num_classes", 0)
        return {"y": torch.arange(16) % k} if k else {}

    def pipeline(self, model):
        from starflow.pipeline import StarflowPipeline  # lazy: the pipeline and its components only for previews and export

        return self.pipeline_factory(model) if self.pipeline_factory else StarflowPipeline(model)

    # ---- checkpoints -------------------------------------------------------------------------
    def _info(self) -> dict:
        return {"lr_scale": self.lr_scale, "train_config": asdict(self.cfg),
                "format": "sharded" if self.sharded else "full", "world_size": self.dist.world_size}

    def save(self) -> str:
        """Checkpoint the current step (collective under torchrun). Returns the folder on every rank."""
        if self.sharded:
            tmp = dist_utils.broadcast_object(ckpt.new_temp_dir(self.ckpt_dir, self.step) if self.is_main else None, self.dist)
            dist_utils.save_sharded(os.path.join(tmp, "sharded"), self.model, self.opt, self.ema)
            dist_utils.barrier(self.dist)
            path = ckpt.finalize(self.ckpt_dir, tmp, self.step, self._info(), self.cfg.keep_last) if self.is_main else None
        else:
            path = None
            if self.is_main:
                opt_tensors, opt_rest = ckpt.flatten_optimizer(self.opt.state_dict(),
                                                               ckpt.optimizer_param_names(self.model, self.opt))
                path = ckpt.save_checkpoint(self.ckpt_dir, self.step,
                                            {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                                             "optimizer": opt_tensors},
                                            {**self._info(), "optimizer": opt_rest}, self.cfg.keep_last)
        self._last_saved = self.step
        self._rollbacks = 0
        return dist_utils.broadcast_object(path, self.dist)

    def load(self, path: str) -> None:
        """Load a checkpoint folder (collective under torchrun; every rank passes the same path)."""
        if self.sharded:
            manifest = ckpt.verify(path) if self.is_main else ckpt.read_manifest(path)
            if manifest.get("format") != "sharded":
                raise ValueError(f"{path} holds a full (single-process/DDP) checkpoint but train.distributed is "
                                 "'fsdp'; resume it with DDP or one process")
            dist_utils.load_sharded(os.path.join(path, "sharded"), self.model, self.opt, self.ema)
        else:
            manifest, tensors = ckpt.load_checkpoint(path, ckpt.FULL_STEMS)
            if manifest.get("format", "full") != "full":
                raise ValueError(f"{path} holds a sharded (FSDP) checkpoint; resume it under torchrun with "
                                 "train.distributed: fsdp (any world size)")
            self.model.load_state_dict(tensors["model"])
            self.ema.load_state_dict(tensors["ema"])
            opt_state = ckpt.unflatten_optimizer(tensors["optimizer"], manifest["optimizer"])
            self.opt.load_state_dict(ckpt.match_optimizer_state(  # by name: the module order may have changed
                opt_state, manifest["optimizer"].get("param_names"), self.model, self.opt, path))
        self.step = manifest["step"]
        self.lr_scale = manifest.get("lr_scale", 1.0)
        self._last_saved = self.step
        saved_batch = (manifest.get("train_config") or {}).get("batch_size")
        if self.is_main and saved_batch not in (None, self.cfg.batch_size):
            warnings.warn(f"{path} was trained with batch_size {saved_batch}, this run uses {self.cfg.batch_size}: "
                          "the resumed run will not match an uninterrupted one")

    def _latest(self) -> str | None:
        """Rank 0 picks the newest valid checkpoint (corrupt ones quarantined); every rank gets its path."""
        required = () if self.sharded else ckpt.FULL_STEMS
        path = ckpt.latest_valid(self.ckpt_dir, quarantine=True, required=required) if self.is_main else None
        return dist_utils.broadcast_object(path, self.dist)

    def resume(self, resume: str | None) -> None:
        if not resume:
            return
        if resume == "auto" and self.is_main:
            ckpt.clean_temp(self.ckpt_dir)
        path = self._latest() if resume == "auto" else resume
        if path is None:
            if self.is_main:
                print(f"no valid checkpoint under {self.ckpt_dir}; starting from step 0", file=sys.stderr)
                self.log({"step": 0, "event": "resume", "checkpoint": None, "time": time.time()})
            return
        self.load(path)
        if self.is_main:
            print(f"resumed from {path} at step {self.step}", file=sys.stderr)
            self.log({"step": self.step, "event": "resume", "checkpoint": path, "time": time.time()})

    # ---- logging & samples -------------------------------------------------------------------
    def log(self, record: dict) -> None:
        """Append one JSON line (rank 0 only). One write call per line, and a line cut off by a kill is
        closed before the next, so every complete line stays parseable."""
        if not self.is_main:
            return
        os.makedirs(self.cfg.out_dir, exist_ok=True)
        line = json.dumps(record) + "\n"
        with open(self.log_path, "ab+") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode())

    # ---- the loop ----------------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        seed = self.cfg.seed * 1_000_003 + step
        torch.manual_seed(seed)
        micro = self.get_batch(step)
        if self.dist.rank:  # randomness a model draws itself must differ between ranks
            torch.manual_seed(_rank_seed(seed, self.dist.rank))
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.lr * group.get("lr_mult", 1.0) * lr_factor(step, self.cfg) * self.lr_scale
        self.wrapped.train()
        self.opt.zero_grad(set_to_none=True)
        A = len(micro)
        total = torch.zeros((), device=self.device)
        for m, (x, y, drop) in enumerate(micro):
            kwargs = self.loss_condition(y, drop)
            with dist_utils.set_gradient_sync(self.wrapped, m == A - 1):
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss = self.wrapped(x, **kwargs)
                (loss / A if A > 1 else loss).backward()
            total = total + loss.detach().float()
        # One all-reduce per step: the global mean loss, and whether any rank was asked to stop.
        stats = torch.stack([total / A, torch.tensor(float(self._signal is not None), device=self.device)])
        stats = dist_utils.all_reduce_sum(stats, self.dist).tolist()
        self._stop_agreed = stats[1] > 0
        loss_value = stats[0] / self.dist.world_size
        if not math.isfinite(loss_value):
            self.opt.zero_grad(set_to_none=True)
            return {"skipped": f"non-finite loss {loss_value}"}
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        if not torch.isfinite(grad_norm):
            self.opt.zero_grad(set_to_none=True)
            return {"skipped": f"non-finite gradient norm {grad_norm.item()}"}
        self.opt.step()
        if self.sharded:
            dist_utils.ema_update_sharded(self.ema, self.model, warmup_decay(
                self.cfg.ema_decay, int(self.ema.n_averaged), self.cfg.ema_warmup))
        else:
            self.ema.update_parameters(self.model)
        return {"loss": loss_value, "grad_norm": grad_norm.item(), "lr": self.opt.param_groups[0]["lr"]}

    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None:  # a second signal: stop now, without the checkpoint
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self._signal = signum
        if self.is_main:
            print(f"received {signal.Signals(signum).name}: saving a checkpoint after the current step",
                  file=sys.stderr, flush=True)

    def train(self, resume: str | None = None) -> str:
        """Train to ``cfg.steps`` and export; raises ``TrainingInterrupted`` after SIGTERM/SIGINT (the
        checkpoint of the step reached is saved first)."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        lock = self._lock() if self.is_main else None
        try:
            return self._train(resume)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if lock is not None:
                lock.close()  # releases the flock

    def _lock(self):
        """Hold an exclusive lock on ``out_dir/train.lock`` for the run (released when the process ends,
        even by SIGKILL), so a second trainer cannot write into the same folder."""
        check_output_dir(self.cfg.out_dir, "train.out_dir")
        path = os.path.join(self.cfg.out_dir, "train.lock")
        try:
            os.makedirs(self.cfg.out_dir, exist_ok=True)
            f = open(path, "a+")
        except OSError as e:
            raise as_output_error(e, path) from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise TrainingError(f"{self.cfg.out_dir} is in use by another trainer (pid {holder}); "
                                "wait for it or pick another --out-dir") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        return f

    def _train(self, resume: str | None) -> str:
        self._signal, self._stop_agreed = None, False
        self.resume(resume)
        cfg = self.cfg
        bad_in_a_row = 0
        t0, seen = time.time(), 0
        bar = Progress(cfg.steps, self.step, enabled=self.is_main, flow=hasattr(self.model, "log_prob"),
                       pixel=not getattr(cfg, "autoencoder", None))
        while self.step < cfg.steps:
            self._stop_agreed = False
            rec = self.train_step(self.step)
            if "skipped" in rec:
                bad_in_a_row += 1
                if self.is_main:
                    warnings.warn(f"step {self.step}: skipped ({rec['skipped']}); {bad_in_a_row} in a row")
                self.log({"step": self.step, "event": "skipped", "reason": rec["skipped"]})
                if bad_in_a_row >= cfg.max_nonfinite_in_a_row:
                    self.rollback()
                    bad_in_a_row = 0
                else:
                    self.step += 1
            else:
                bad_in_a_row = 0
                self.step += 1
                seen += cfg.batch_size
                bar.update()
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    dt = time.time() - t0
                    rec.update(step=self.step, images_per_s=seen / dt if dt > 0 else float("nan"), time=time.time())
                    self.log(rec)
                    bar.logged(self.step, rec)
                    t0, seen = time.time(), 0
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    self.save()
                if self.step % cfg.sample_every == 0 or self.step == cfg.steps:
                    self.save_samples()
            if self._stop_agreed or (not self.dist.enabled and self._signal is not None):
                self._stop()
        bar.close()
        if bad_in_a_row:
            raise TrainingError(f"the run ended inside a streak of {bad_in_a_row} non-finite step(s) (last step "
                                f"{self.step}); not exported. Resume from {self._latest()} with a lower train.lr "
                                "or more steps")
        return self.export()

    def _stop(self) -> None:
        signum = self._signal if self._signal is not None else signal.SIGTERM  # another rank's signal
        path = self.save() if self._last_saved != self.step else os.path.join(self.ckpt_dir, f"step_{self.step:07d}")
        self.log({"step": self.step, "event": "interrupted", "signal": signal.Signals(signum).name,
                  "checkpoint": path, "time": time.time()})
        raise TrainingInterrupted(signum, self.step, path)

    def rollback(self) -> None:
        path = self._latest()
        if path is None:
            raise TrainingError(f"{self.cfg.max_nonfinite_in_a_row} non-finite steps in a row and no checkpoint to roll back to")
        if self._rollbacks >= self.cfg.max_rollbacks:
            raise TrainingError(f"training diverged: {self.cfg.max_nonfinite_in_a_row} non-finite steps in a row "
                                f"again after {self._rollbacks} rollback(s) to {path} (learning rate x{self.lr_scale}); "
                                "the data or the config produces NaN (check train.noise_std, train.lr, the dataset)")
        rollbacks = self._rollbacks + 1
        lr_scale = self.lr_scale * 0.5
        self.load(path)
        self.lr_scale = lr_scale
        self._rollbacks = rollbacks
        if self.is_main:
            warnings.warn(f"rolled back to {path} (step {self.step}) with learning rate x{self.lr_scale}")
        self.log({"step": self.step, "event": "rollback", "checkpoint": path, "lr_scale": self.lr_scale})
