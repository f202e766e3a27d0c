"""Typed configs. Every field is validated where it is built, with a message that names the field."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import yaml


class ConfigError(ValueError):
    pass


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

    def __post_init__(self):
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

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    @property
    def conditional(self) -> bool:
        return bool(self.num_classes or self.cond_dim)

    def block_layers(self) -> list[int]:
        layers = [self.layers_per_block] * self.num_blocks
        if self.deep_layers is not None:
            layers[-1] = self.deep_layers
        return layers


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
    batch_size: int = 64
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

    def __post_init__(self):
        self.betas = tuple(self.betas)
        for name in ("steps", "batch_size", "log_every", "ckpt_every", "sample_every", "keep_last"):
            _check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        _check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        _check(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        _check(self.precision in ("auto", "fp32", "bf16"), "precision", f"expected auto|fp32|bf16, got {self.precision!r}")
        _check(self.noise_std >= 0, "noise_std", "must be >= 0")


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
    return cls(**data)


def load_run_config(path: str, overrides: dict | None = None) -> RunConfig:
    from starflow.models import model_class

    with open(path) as f:
        data = yaml.safe_load(f) or {}
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
