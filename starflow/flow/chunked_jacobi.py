"""The released STARFlow model's Jacobi sampler (``sampler="chunked-jacobi"``), beside our ``jacobi``.

Tokens are decoded in consecutive chunks of K. Every token's first guess is its own noise z. For a chunk
s..e-1 one sweep feeds the token before the chunk (final) and the current guesses of s..e-2 through the
block in parallel, and updates all guesses at once:

    x_new = z * sigma(x_old) + mu(x_old)
    stop when mean((x_new - x_old)^2) / mean(x_new^2) < threshold, or after a cap on sweeps.

Differences from ``jacobi``: the stopping rule is a relative mean-square change (not a max-abs change),
there is a sweep cap (32 by default) rather than the exactness bound, and the key/value cache is kept
from the last sweep rather than recomputed from the final values: the next chunk re-feeds the chunk's
last token, the others keep the keys of their second-to-last guesses. Converged (or run for K + 1 sweeps)
the answer equals the sequential one; stopped early it is the official approximation, exactly.
"""
from __future__ import annotations

import torch

DEFAULT_CHUNK = 16
DEFAULT_MAX_ITERS = 32


def chunked_jacobi(block, z_perm: torch.Tensor, ctx, step, opts, iters_out: list[int]) -> torch.Tensor:
    """z_perm [B, L, D] in the block's order -> x_perm. ``step`` turns raw outputs into (mu, alpha), guided
    when it doubles the batch; ``opts.jacobi_window`` is K (0: 16), ``opts.jacobi_max_iters`` the cap
    (0: 32), ``opts.jacobi_threshold`` the relative mean-square change that stops a chunk."""
    B, L, _ = z_perm.shape
    K = opts.jacobi_window or DEFAULT_CHUNK
    max_iters = opts.jacobi_max_iters or DEFAULT_MAX_ITERS
    caches = block.new_caches(ctx)
    rows = 2 * B if step.guided else B
    first = block.prefill(ctx, caches, rows, z_perm.device)  # predicts token 0; the prefix stays cached
    x = z_perm.clone()
    for s in range(0, L, K):
        e = min(s + K, L)
        zc = z_perm[:, s:e]
        for it in range(max_iters):
            if s == 0:  # token 0 is predicted by the prefill; feed guesses of 0..e-2
                out = first if e == 1 else torch.cat([first, block.extend(step.feed(x[:, :e - 1]), 0, ctx, caches)], 1)
            else:  # feed the final token s-1 and the guesses of s..e-2; writing from s-1 rewinds the cache
                out = block.extend(step.feed(x[:, s - 1:e - 1]), s - 1, ctx, caches)
            mu, alpha = step.params(out, s)
            new = zc * torch.exp(alpha) + mu
            change = ((new - x[:, s:e]) ** 2).mean() / (new ** 2).mean()
            x[:, s:e] = new
            if change.item() < opts.jacobi_threshold:
                break
        iters_out.append(it + 1)
    return x
