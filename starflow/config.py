"""Typed configs. Every field is validated where it is built, with a message that names the field."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import yaml

from starflow.errors import ConfigError, LimitError  # noqa: F401  (ConfigError re-exported: callers import it here)
from starflow.schema import check_model_memory, check_types, transformer_params


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


@dataclass
class FlowConfig:
    """A stack of autoregressive affine flow blocks (TARFlow), optionally deep-shallow (STARFlow).

    Block ``num_blocks - 1`` is nearest the prior (sampled first); with ``deep_layers`` set it is the
    deep block and the others are shallow with ``layers_per_block`` layers each. Without it every
    block has ``layers_per_block`` layers (the "uniform" TARFlow stack).
    """

    in_channels: int = 1
    image_size: int = 28
    patch_size: int = 4
    width: int = 128
    head_dim: int = 32
    mlp_ratio: float = 4.0
    num_blocks: int = 4
    layers_per_block: int = 2
    deep_layers: int | None = None
    num_classes: int = 0          # 0 = no class conditioning
    cond_dim: int = 0             # text-encoder state width; 0 = no text conditioning
    max_text_tokens: int = 32
    cond_mode: str = "prefix"     # "prefix": STARFlow prefix tokens; "add": official TARFlow additive embedding
    cond_blocks: str = "deep"     # which blocks see the condition: "deep" (STARFlow) or "all" (TARFlow)
    cond_drop_prob: float = 0.1   # condition replaced by the learned null in training (for guidance)
    norm: str = "layernorm"       # "layernorm" | "rmsnorm"
    qk_norm: bool = False
    affine: bool = True           # False: shift-only (volume-preserving) steps
    buckets: list | None = None   # extra allowed [H, W] sizes (aspect-ratio buckets), each <= image_size
    # ---- architecture switches of the released STARFlow model (defaults: the original TARFlow block) ----
    positions: str = "learned"    # "learned" table, or "rope": rotary, 2-D on image tokens, 3-D with a prefix
    start_token: bool = False     # a learned start token, so token 0 is predicted too
    scale: str = "exp"            # sigma = exp(a), or "softplus": sigma = softplus(a + 0.5413) (sigma = 1 at a = 0)
    soft_clip: float = 0.0        # > 0: raw outputs become c * tanh(out / c)
    final_norm: bool = False      # an RMSNorm (gain stored as offset from 1) before the output projection
    seq_order: str = "R2L"        # "R2L": block 0 keeps the token order, odd blocks reverse; "L2R": the opposite
    num_kv_heads: int | None = None  # fewer key/value heads than query heads: grouped-query attention
    mlp: str = "gelu"             # "gelu" | "swiglu" (the official gated MLP)
    deep_width: int | None = None  # width of the deep block (last block) when it differs from ``width``
    learned_null: bool = True     # False: no learned null condition; guidance takes an explicit negative
    text_padding: str = "mask"    # "mask": padded text tokens are hidden; "attend": states are zero-padded
                                  # to max_text_tokens and all attended (the released model's prefix)
    source_prefix: bool = False   # edit models: Condition.source (the source image) prefixes the deep block

    def __post_init__(self):
        check_types(self)
        _check(self.in_channels > 0, "in_channels", f"must be positive, got {self.in_channels}")
        _check(self.patch_size > 0, "patch_size", f"must be positive, got {self.patch_size}")
        _check(self.image_size % self.patch_size == 0, "image_size",
               f"{self.image_size} is not divisible by patch_size {self.patch_size}")
        _check(self.head_dim > 0 and self.width % self.head_dim == 0, "width",
               f"{self.width} is not divisible by head_dim {self.head_dim}")
        _check(self.num_blocks >= 1, "num_blocks", f"must be >= 1, got {self.num_blocks}")
        _check(self.layers_per_block >= 1, "layers_per_block", f"must be >= 1, got {self.layers_per_block}")
        _check(self.deep_layers is None or self.deep_layers >= 1, "deep_layers", "must be None or >= 1")
        _check(self.num_classes >= 0, "num_classes", "must be >= 0")
        _check(self.cond_dim >= 0, "cond_dim", "must be >= 0")
        _check(not (self.num_classes and self.cond_dim), "cond_dim", "use either num_classes or cond_dim, not both")
        _check(self.cond_mode in ("prefix", "add"), "cond_mode", f"expected 'prefix' or 'add', got {self.cond_mode!r}")
        _check(not (self.cond_mode == "add" and self.cond_dim), "cond_mode", "'add' supports class labels only")
        _check(self.cond_blocks in ("deep", "all"), "cond_blocks", f"expected 'deep' or 'all', got {self.cond_blocks!r}")
        _check(0.0 <= self.cond_drop_prob < 1.0, "cond_drop_prob", f"must be in [0, 1), got {self.cond_drop_prob}")
        _check(self.norm in ("layernorm", "rmsnorm"), "norm", f"expected 'layernorm' or 'rmsnorm', got {self.norm!r}")
        _check(self.mlp_ratio > 0, "mlp_ratio", "must be positive")
        _check(self.positions in ("learned", "rope"), "positions", f"expected 'learned' or 'rope', got {self.positions!r}")
        _check(self.scale in ("exp", "softplus"), "scale", f"expected 'exp' or 'softplus', got {self.scale!r}")
        _check(self.soft_clip >= 0, "soft_clip", f"must be >= 0, got {self.soft_clip}")
        _check(self.seq_order in ("R2L", "L2R"), "seq_order", f"expected 'R2L' or 'L2R', got {self.seq_order!r}")
        _check(self.mlp in ("gelu", "swiglu"), "mlp", f"expected 'gelu' or 'swiglu', got {self.mlp!r}")
        _check(self.text_padding in ("mask", "attend"), "text_padding", f"expected 'mask' or 'attend', got {self.text_padding!r}")
        _check(self.deep_width is None or (self.deep_width > 0 and self.deep_width % self.head_dim == 0), "deep_width",
               f"must be None or a positive multiple of head_dim {self.head_dim}, got {self.deep_width}")
        for w in {self.width, self.deep_width or self.width}:
            heads = w // self.head_dim
            _check(self.num_kv_heads is None or (0 < self.num_kv_heads <= heads and heads % self.num_kv_heads == 0),
                   "num_kv_heads", f"must divide the {heads} attention heads of width {w}, got {self.num_kv_heads}")
        _check(self.learned_null or self.cond_drop_prob == 0, "learned_null",
               "condition dropout needs a learned null (set cond_drop_prob: 0 or learned_null: true)")
        if self.positions == "rope":
            from starflow.nn.rope import check_rope_head_dim  # lazy: torch only for rotary configs

            why = check_rope_head_dim(self.head_dim, self.conditional and self.cond_mode == "prefix")
            _check(why is None, "head_dim", str(why))
        for hw in self.buckets or []:
            _check(isinstance(hw, (list, tuple)) and len(hw) == 2 and all(_is_int(v) and 0 < v <= self.image_size and v % self.patch_size == 0 for v in hw), "buckets",
                   f"{hw!r} must be [H, W] with 0 < H, W <= image_size {self.image_size}, divisible by patch_size {self.patch_size}")
        if self.buckets:
            self.buckets = [list(map(int, hw)) for hw in self.buckets]

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    @property
    def conditional(self) -> bool:
        return bool(self.num_classes or self.cond_dim)

    def image_sizes(self) -> list[tuple[int, int]]:
        """(H, W) sizes the model accepts: the square image_size and any aspect-ratio buckets."""
        return [(self.image_size, self.image_size)] + [tuple(hw) for hw in self.buckets or []]

    def block_layers(self) -> list[int]:
        layers = [self.layers_per_block] * self.num_blocks
        if self.deep_layers is not None:
            layers[-1] = self.deep_layers
        return layers


def check_flow_memory(c: FlowConfig, bytes_per_param: float = 4.0) -> None:
    """Refuse (before allocating) a flow whose weights and one example's activations cannot fit. Called
    where weights are about to be allocated (model construction off the meta device, loading), not for
    a config alone: a config of a model too large for this machine is still a valid description."""
    layers = sum(c.block_layers())
    per_block = 2 * c.token_dim * c.width + c.num_tokens * c.width  # in/out projections, positions
    params = (transformer_params(c.width, layers, c.mlp_ratio) + c.num_blocks * per_block
              + (c.num_classes + 1 + c.cond_dim) * c.width)
    activations = layers * c.num_tokens * (c.width * (4 + c.mlp_ratio) + c.num_tokens * c.width // c.head_dim)
    check_model_memory(params, activations, bytes_per_param=bytes_per_param)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class TrainConfig:
    dataset: str = "mnist"            # mnist | digits | shapes | folder:PATH
    image_size: int | None = None     # folder and shapes datasets
    channels: int = 1                 # folder datasets only
    dataset_size: int = 10000         # shapes: number of generated training scenes
    autoencoder: str | None = None    # latent training: a shipped name (mnist, shapes) or a diffusers VAE folder
    decoder: str | None = None        # autoencoder to ship for decoding (e.g. mnist_ft, a fine-tuned decoder)
    text_encoder: str | None = None   # text-conditional training: "minilm" or a transformers folder
    out_dir: str = "runs/mnist"
    steps: int = 2000
    batch_size: int = 64              # the global batch: split over ranks and accumulation micro-steps
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    noise_std: float = 0.0            # extra Gaussian noise on [-1,1] pixels (TARFlow's augmentation); 0 = only dequantise
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
        # Types first, so the range checks below never compare a string with a number.
        for name in ("dataset", "out_dir", "precision", "device", "distributed"):
            value = getattr(self, name)
            _check(isinstance(value, str) and value.strip() != "", name, f"must be a non-empty string, got {value!r}")
        for name in ("autoencoder", "decoder", "text_encoder"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, str) and value.strip() != ""), name,
                   f"must be a non-empty string or null, got {value!r}")
        for name in ("channels", "dataset_size", "steps", "batch_size", "warmup_steps", "seed", "log_every",
                     "ckpt_every", "sample_every", "keep_last", "num_workers", "max_nonfinite_in_a_row",
                     "grad_accum_steps", "max_rollbacks"):
            value = getattr(self, name)
            _check(_is_int(value), name, f"must be an integer, got {value!r} ({type(value).__name__})")
        _check(self.image_size is None or _is_int(self.image_size), "image_size",
               f"must be an integer or null, got {self.image_size!r}")
        for name in ("lr", "weight_decay", "min_lr_ratio", "grad_clip", "ema_decay", "noise_std"):
            value = getattr(self, name)
            if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
            _check(_is_number(value) and math.isfinite(value), name,
                   f"must be a finite number, got {getattr(self, name)!r}")
            setattr(self, name, float(value))
        for name in ("grad_checkpointing", "ddp_find_unused_parameters"):
            _check(isinstance(getattr(self, name), bool), name, f"must be true or false, got {getattr(self, name)!r}")
        _check(isinstance(self.betas, (list, tuple)) and len(self.betas) == 2 and all(map(_is_number, self.betas)),
               "betas", f"must be two numbers, got {self.betas!r}")
        self.betas = tuple(float(b) for b in self.betas)
        _check(all(0.0 <= b < 1.0 for b in self.betas), "betas", f"each must be in [0, 1), got {self.betas}")

        # Ranges.
        for name in ("steps", "batch_size", "log_every", "ckpt_every", "sample_every", "keep_last",
                     "dataset_size", "channels", "max_nonfinite_in_a_row", "grad_accum_steps", "max_rollbacks"):
            _check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        _check(self.image_size is None or self.image_size > 0, "image_size", f"must be positive, got {self.image_size}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.seed < 2**31, "seed", f"must be in [0, 2**31), got {self.seed}")
        _check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        _check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.grad_clip > 0, "grad_clip", f"must be positive, got {self.grad_clip}")
        _check(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        _check(self.noise_std >= 0, "noise_std", f"must be >= 0, got {self.noise_std}")
        _check(self.precision in ("auto", "fp32", "bf16"), "precision", f"expected auto|fp32|bf16, got {self.precision!r}")
        _check(self.distributed in ("ddp", "fsdp"), "distributed", f"expected ddp|fsdp, got {self.distributed!r}")
        _check(self.batch_size % self.grad_accum_steps == 0, "grad_accum_steps",
               f"batch_size {self.batch_size} is not divisible by grad_accum_steps {self.grad_accum_steps}")
        _check(self.dataset in ("mnist", "digits", "shapes") or
               (self.dataset.startswith("folder:") and len(self.dataset) > len("folder:")), "dataset",
               f"expected mnist, digits, shapes or folder:PATH, got {self.dataset!r}")
        _check(not self.dataset.startswith("folder:") or self.image_size is not None, "image_size",
               "a folder dataset needs image_size")
        _check(self.decoder is None or self.autoencoder is not None, "decoder", "needs train.autoencoder (latent training)")
        if self.device != "auto":
            try:
                import torch

                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ConfigError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}") from None


@dataclass
class RunConfig:
    """What a YAML recipe holds: which model family, its config, and how to train it."""

    model_type: str = "starflow"
    model: object = field(default_factory=FlowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _build(cls, data: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
    try:
        return cls(**data)
    except LimitError as e:
        raise LimitError(f"{where}: {e}") from None
    except (ValueError, TypeError) as e:  # the peers' configs raise plain ValueError
        raise ConfigError(f"{where}: {e}") from None


def read_yaml(path: str, what: str = "YAML file") -> dict:
    """A YAML mapping from ``path`` (safe loader), or ``ConfigError`` naming the file and the problem."""
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path} is a folder, expected a YAML file")
    if not os.path.exists(path):
        raise ConfigError(f"{what} {path} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {' '.join(str(e).split())}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not a text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping (field: value), got a {type(data).__name__}")
    return data


def load_run_config(path: str, overrides: dict | None = None) -> RunConfig:
    from starflow.models import model_class  # lazy: the registry's model modules import this one

    data = read_yaml(path, "recipe")
    for section in ("model", "train"):
        _check(data.get(section) is None or isinstance(data[section], dict), f"{path}: {section}",
               f"must be a mapping of field: value, got {type(data.get(section)).__name__}")
    unknown = set(data) - {"model_type", "model", "train"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; expected 'model_type', 'model' and 'train'")
    model = dict(data.get("model") or {})
    train = dict(data.get("train") or {})
    model_type = data.get("model_type", "starflow")
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if key == "model_type":
            model_type = value
            continue
        {"model": model, "train": train}[section][name] = value
    try:
        cls = model_class(model_type).config_class
    except ValueError as e:
        raise ConfigError(f"{path}: model_type: {e}") from None
    return RunConfig(model_type, _build(cls, model, f"{path}: model"), _build(TrainConfig, train, f"{path}: train"))
