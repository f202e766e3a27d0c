"""Inverting one flow block (noise -> data), three ways that give the same answer:

* ``sequential``: token by token with a preallocated key/value cache; one token of transformer work
  per step. Conditional and unconditional (guidance) branches run as one batch of 2B.
* ``jacobi``: fixed-point iteration x <- z * exp(alpha(x)) + mu(x) over a window of K tokens in
  parallel (K = all tokens by default). Token s+k is exact after k+1 sweeps, so at most K sweeps
  reach the sequential answer; it usually converges far sooner, which is where the speed comes from.
* ``naive``: recompute the whole prefix for every token with no cache. Only a reference for tests
  and benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from starflow.flow.block import Context, FlowBlock
from starflow.flow.chunked_jacobi import chunked_jacobi
from starflow.flow.guidance import Guidance
from starflow.flow.samplers import SAMPLERS  # noqa: F401  (re-exported)
from starflow.nn.packed_linear import PackedLinear


@dataclass
class SamplingStats:
    """What one ``STARFlow.inverse`` call did: the per-block plan and Jacobi sweeps per window
    (index = block index; sequential blocks have no sweeps)."""
    plan: list[str]
    iterations: list[list[int]]

    def sweeps(self) -> list[int]:
        """Jacobi sweeps per block window in sampling order (the last block first)."""
        return [it for b in reversed(range(len(self.iterations))) for it in self.iterations[b]]


@dataclass
class SamplerOptions:
    """How a block is inverted. Guidance is not a sampler option: it is handed over as one ``Guidance``."""
    sampler: str = "sequential"
    jacobi_threshold: float = 1e-3
    jacobi_window: int = 0        # 0 = the whole block in one window
    jacobi_max_iters: int = 0     # 0 = window length (always enough for the exact answer)

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {', '.join(SAMPLERS)}")
        if not self.jacobi_threshold > 0:
            raise ValueError(f"jacobi threshold must be > 0, got {self.jacobi_threshold}")
        if self.jacobi_window < 0 or self.jacobi_max_iters < 0:
            raise ValueError("jacobi window and max iterations must be >= 0")


class _Step:
    """Turns raw block outputs into (mu, alpha); with a ``Guidance`` the batch is doubled and combined."""

    def __init__(self, block: FlowBlock, guidance: Guidance | None, num_tokens: int):
        self.block, self.guidance, self.num_tokens = block, guidance, num_tokens
        self.guided = guidance is not None
        self._positions = None

    def params(self, out: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        mu, alpha = self.block.split(out)
        if not self.guided:
            return mu, alpha
        if self._positions is None or self._positions.device != mu.device:
            self._positions = torch.arange(self.num_tokens, device=mu.device)
        positions = self._positions[start:start + (mu.shape[1] if mu.ndim == 3 else 1)]
        return self.guidance.combine(mu, alpha, positions, self.num_tokens)

    def feed(self, x: torch.Tensor) -> torch.Tensor:
        return self.guidance.feed(x) if self.guided else x


def invert_block(block: FlowBlock, z: torch.Tensor, ctx: Context, guidance: Guidance | None, opts: SamplerOptions,
                 jacobi_iters: list[int] | None = None) -> torch.Tensor:
    """z [B, L, D] in canonical order -> x [B, L, D] in canonical order. With ``guidance`` the ``ctx`` is
    built for 2B rows (conditional then unconditional, ``Guidance.pair``). Jacobi appends its sweeps per
    window to ``jacobi_iters``."""
    guidance = guidance or None  # an unguided block may be given False
    z_perm = z[:, ctx.perm]
    step = _Step(block, guidance, ctx.num_tokens)
    if opts.sampler == "naive":
        x_perm = _naive(block, z_perm, ctx, step)
    elif opts.sampler == "chunked-jacobi":
        x_perm = chunked_jacobi(block, z_perm, ctx, step, opts, jacobi_iters if jacobi_iters is not None else [])
    elif opts.sampler == "jacobi":
        x_perm = _jacobi(block, z_perm, ctx, step, opts, jacobi_iters if jacobi_iters is not None else [])
    else:
        x_perm = _sequential(block, z_perm, ctx, step)
    return x_perm[:, ctx.inv_perm]


def _rows(z_perm, guided):
    return 2 * z_perm.shape[0] if guided else z_perm.shape[0]


class TokenDecoder:
    """Cached decoding of one block, one token per row per step, on the lean per-layer path
    (``TransformerLayer.decode``): 2-D activations, functional kernels, no masks unless a prefix is
    padded. Batch-1 sampling is bound by per-kernel dispatch, so every call saved is time saved; from a
    few rows on, the matmuls dominate and take weights packed once for the CPU's GEMM (``PackedLinear``)."""

    def __init__(self, block: FlowBlock, ctx: Context, rows: int, like: torch.Tensor):
        """``like``: a tensor of the sampling device and dtype (the noise)."""
        self.block, self.ctx = block, ctx
        self.caches = block.new_caches(ctx)
        self.first = block.prefill(ctx, self.caches, rows, like.device)[:, 0]  # predicts token 0, [R, out]
        self.linear = PackedLinear(rows, like)
        valid = ctx.key_valid(ctx.num_tokens)
        self.key_mask = None if valid is None else valid[:, None, None, :]
        self.pos_rows = block.pos_embed[ctx.pos_perm]  # [L, C] in the block's order
        self.prefix_len = ctx.prefix_len

    def step(self, x_tok: torch.Tensor, i: int) -> torch.Tensor:
        """Feed permuted token i (x_tok [R, D]); return the raw output predicting token i + 1, [R, out]."""
        b = self.block
        h = self.linear(x_tok, b.proj_in) + self.pos_rows[i]
        if self.ctx.add is not None:
            h = h + self.ctx.add
        pos = self.prefix_len + i
        for layer, cache in zip(b.layers, self.caches):
            h = layer.decode(h, cache, pos, self.key_mask, self.linear)
        out = self.linear(h, b.proj_out)
        return out if out.dtype == torch.float64 else out.float()


def lean_decodable(block: FlowBlock) -> bool:
    """Whether ``TokenDecoder`` covers this block: the original TARFlow block (learned positions, exp
    scale, plain GELU MLP, full attention heads). Blocks with the released model's switches (rotary
    positions, start token, softplus scale, soft clip, final norm, GQA, SwiGLU) decode through
    ``block.extend``, which implements them."""
    attn = block.layers[0].attention if len(block.layers) else None
    return (block.pos_embed is not None and not block.start_token and block.scale == "exp" and not block.soft_clip
            and block.final_norm is None and not block.layers[0].mlp.swiglu
            and attn is not None and attn.num_kv_heads == attn.num_heads)


def _sequential(block, z_perm, ctx, step):
    if not lean_decodable(block):
        return _sequential_extend(block, z_perm, ctx, step)
    B, L, _ = z_perm.shape
    dec = TokenDecoder(block, ctx, _rows(z_perm, step.guided), z_perm)
    out = dec.first
    x = torch.empty_like(z_perm)
    for i in range(L):
        mu, alpha = step.params(out, i)
        x[:, i] = z_perm[:, i] * torch.exp(alpha) + mu
        if i + 1 < L:
            out = dec.step(step.feed(x[:, i]), i)
    return x


def _sequential_extend(block, z_perm, ctx, step):
    """Cached sequential decoding through ``block.extend`` (every architecture switch)."""
    B, L, _ = z_perm.shape
    caches = block.new_caches(ctx)
    out = block.prefill(ctx, caches, _rows(z_perm, step.guided), z_perm.device)
    x = torch.empty_like(z_perm)
    for i in range(L):
        mu, alpha = step.params(out, i)
        x[:, i:i + 1] = z_perm[:, i:i + 1] * torch.exp(alpha) + mu
        if i + 1 < L:
            out = block.extend(step.feed(x[:, i:i + 1]), i, ctx, caches)
    return x


def _naive(block, z_perm, ctx, step):
    B, L, _ = z_perm.shape
    x = torch.empty_like(z_perm)
    for i in range(L):
        caches = block.new_caches(ctx)  # fresh every token: the whole prefix is recomputed
        out = block.prefill(ctx, caches, _rows(z_perm, step.guided), z_perm.device)
        if i:
            out = block.extend(step.feed(x[:, :i]), 0, ctx, caches)[:, -1:]
        mu, alpha = step.params(out, i)
        x[:, i:i + 1] = z_perm[:, i:i + 1] * torch.exp(alpha) + mu
    return x


def _jacobi(block, z_perm, ctx, step, opts, iters_out):
    B, L, _ = z_perm.shape
    K = opts.jacobi_window or L
    caches = block.new_caches(ctx)
    first = block.prefill(ctx, caches, _rows(z_perm, step.guided), z_perm.device)  # predicts token s
    x = torch.empty_like(z_perm)
    for s in range(0, L, K):
        e = min(s + K, L)
        zw = z_perm[:, s:e]
        xw = zw.clone()
        max_iters = opts.jacobi_max_iters or (e - s)
        for it in range(max_iters):
            # Feed the current guess of tokens s..e-2; outputs predict s+1..e-1.
            out = block.extend(step.feed(xw[:, :-1]), s, ctx, caches) if e - s > 1 else first[:, :0]
            mu, alpha = step.params(torch.cat([first, out], dim=1), s)
            x_new = zw * torch.exp(alpha) + mu
            delta = (x_new - xw).abs().max().item()
            xw = x_new
            if delta < opts.jacobi_threshold:
                break
        iters_out.append(it + 1)
        x[:, s:e] = xw
        if e < L:  # commit the window to the cache; its last output predicts the next window's first token
            first = block.extend(step.feed(xw), s, ctx, caches)[:, -1:]
    return x
