"""FLOP accounting for a flow stack (multiply-add = 2 FLOPs), so benchmarks can state achieved FLOP/s
against the machine's measured matmul peak. Norms, activations and softmax are left out (they are
a few percent at these widths); attention scores count the keys each query really sees."""
from __future__ import annotations

import time

import torch

from starflow.flow.config import FlowConfig


def _layer_flops(width: int, mlp_ratio: float, keys: float) -> float:
    """One transformer layer, one query token attending to ``keys`` keys."""
    dense = 2 * width * (3 * width) + 2 * width * width + 2 * 2 * width * int(width * mlp_ratio)
    return dense + 2 * 2 * width * keys  # QK^T and AV


def _block_io_flops(c: FlowConfig) -> float:
    out = 2 * c.token_dim if c.affine else c.token_dim
    return 2 * c.token_dim * c.width + 2 * c.width * out


def _prefix_len(c: FlowConfig, block: int) -> int:
    conditional = c.conditional and (c.cond_blocks == "all" or block == c.num_blocks - 1)
    return 1 if conditional and c.cond_mode == "prefix" else 0  # text prefixes: pass the real length


def forward_flops(c: FlowConfig) -> float:
    """data -> noise for one image, all tokens in parallel (training forward; backward is ~2x this)."""
    L, total = c.num_tokens, 0.0
    for b, layers in enumerate(c.block_layers()):
        P = _prefix_len(c, b)
        n = L + P
        mean_keys = (n + 1) / 2  # causal: query i sees i+1 keys
        total += layers * n * _layer_flops(c.width, c.mlp_ratio, mean_keys) + L * _block_io_flops(c)
    return total


def sampling_flops(c: FlowConfig, guided: bool = False, jacobi_sweeps: list[int] | None = None) -> float:
    """noise -> data for one image with the KV cache (every token processed once per block), or with
    Jacobi given the sweeps each block used (each sweep re-runs the whole block). Guidance doubles the
    conditional block's work."""
    L, total = c.num_tokens, 0.0
    for b, layers in enumerate(c.block_layers()):
        P = _prefix_len(c, b)
        mult = 2 if guided and P else 1
        per_pass = layers * (L + P) * _layer_flops(c.width, c.mlp_ratio, (L + P + 1) / 2) + L * _block_io_flops(c)
        sweeps = 1 if jacobi_sweeps is None else jacobi_sweeps[c.num_blocks - 1 - b] + 1
        total += mult * sweeps * per_pass
    return total


def measure_matmul_peak(n: int = 1024, dtype=torch.float32, repeats: int = 10, device="cpu") -> float:
    """Achieved FLOP/s of an n x n matmul on this machine, best of ``repeats``."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
