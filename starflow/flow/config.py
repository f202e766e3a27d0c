"""The flow's config: a stack of autoregressive affine flow blocks (TARFlow), optionally deep-shallow (STARFlow).

Every field is validated where the config is built, with a message that names the field (the shared
checks are in ``starflow.schema``).
"""
from __future__ import annotations

from dataclasses import dataclass

from starflow.schema import check_model_memory, check_noise_std, check_types, is_int, require, transformer_params


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
    noise_std: float | None = None  # Gaussian noise on the training data (see schema.check_noise_std)
    source_prefix: bool = False   # edit models: Condition.source (the source image) prefixes the deep block
    text_positions: bool = False  # learned positions added to the text prefix (zero at init). Without them (or
                                  # rope) only the causal mask within the prefix orders it; the shipped shapes
                                  # model learned colour-shape binding that way too, given enough images
    input_spline_bins: int = 0    # > 0: a learned monotone spline per channel before block 0 (flow/input_spline.py)
    input_spline_bound: float = 1.0  # the spline acts on [-bound, bound] (pixels: [-1, 1]); identity outside

    def __post_init__(self):
        check_types(self)
        check_noise_std(self)
        require(self.in_channels > 0, "in_channels", f"must be positive, got {self.in_channels}")
        require(self.patch_size > 0, "patch_size", f"must be positive, got {self.patch_size}")
        require(self.image_size % self.patch_size == 0, "image_size",
               f"{self.image_size} is not divisible by patch_size {self.patch_size}")
        require(self.head_dim > 0 and self.width % self.head_dim == 0, "width",
               f"{self.width} is not divisible by head_dim {self.head_dim}")
        require(self.num_blocks >= 1, "num_blocks", f"must be >= 1, got {self.num_blocks}")
        require(self.layers_per_block >= 1, "layers_per_block", f"must be >= 1, got {self.layers_per_block}")
        require(self.deep_layers is None or self.deep_layers >= 1, "deep_layers", "must be None or >= 1")
        require(self.num_classes >= 0, "num_classes", "must be >= 0")
        require(self.cond_dim >= 0, "cond_dim", "must be >= 0")
        require(not (self.num_classes and self.cond_dim), "cond_dim", "use either num_classes or cond_dim, not both")
        require(self.cond_mode in ("prefix", "add"), "cond_mode", f"expected 'prefix' or 'add', got {self.cond_mode!r}")
        require(not (self.cond_mode == "add" and self.cond_dim), "cond_mode", "'add' supports class labels only")
        require(self.cond_blocks in ("deep", "all"), "cond_blocks", f"expected 'deep' or 'all', got {self.cond_blocks!r}")
        require(0.0 <= self.cond_drop_prob < 1.0, "cond_drop_prob", f"must be in [0, 1), got {self.cond_drop_prob}")
        require(self.norm in ("layernorm", "rmsnorm"), "norm", f"expected 'layernorm' or 'rmsnorm', got {self.norm!r}")
        require(self.mlp_ratio > 0, "mlp_ratio", "must be positive")
        require(self.positions in ("learned", "rope"), "positions", f"expected 'learned' or 'rope', got {self.positions!r}")
        require(self.scale in ("exp", "softplus"), "scale", f"expected 'exp' or 'softplus', got {self.scale!r}")
        require(self.soft_clip >= 0, "soft_clip", f"must be >= 0, got {self.soft_clip}")
        require(self.seq_order in ("R2L", "L2R"), "seq_order", f"expected 'R2L' or 'L2R', got {self.seq_order!r}")
        require(self.mlp in ("gelu", "swiglu"), "mlp", f"expected 'gelu' or 'swiglu', got {self.mlp!r}")
        require(self.text_padding in ("mask", "attend"), "text_padding", f"expected 'mask' or 'attend', got {self.text_padding!r}")
        require(self.deep_width is None or (self.deep_width > 0 and self.deep_width % self.head_dim == 0), "deep_width",
               f"must be None or a positive multiple of head_dim {self.head_dim}, got {self.deep_width}")
        for w in {self.width, self.deep_width or self.width}:
            heads = w // self.head_dim
            require(self.num_kv_heads is None or (0 < self.num_kv_heads <= heads and heads % self.num_kv_heads == 0),
                   "num_kv_heads", f"must divide the {heads} attention heads of width {w}, got {self.num_kv_heads}")
        require(self.input_spline_bins == 0 or self.input_spline_bins >= 2, "input_spline_bins",
               f"must be 0 (no spline) or >= 2, got {self.input_spline_bins}")
        require(self.input_spline_bound > 0, "input_spline_bound", f"must be positive, got {self.input_spline_bound}")
        require(not self.text_positions or self.cond_dim > 0, "text_positions", "needs text conditioning (cond_dim > 0)")
        require(self.learned_null or self.cond_drop_prob == 0, "learned_null",
               "condition dropout needs a learned null (set cond_drop_prob: 0 or learned_null: true)")
        if self.positions == "rope":
            from starflow.nn.rope import check_rope_head_dim  # lazy: torch only for rotary configs

            why = check_rope_head_dim(self.head_dim, self.conditional and self.cond_mode == "prefix")
            require(why is None, "head_dim", str(why))
        for hw in self.buckets or []:
            require(isinstance(hw, (list, tuple)) and len(hw) == 2 and all(is_int(v) and 0 < v <= self.image_size and v % self.patch_size == 0 for v in hw), "buckets",
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
