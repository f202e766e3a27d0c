"""An elementwise monotone spline between the data and the first flow block (DESIGN.md §2).

Every step of the stack is affine in the value it transforms, so a dimension whose conditional density
is a box cannot be fitted well: the uniform dequantisation noise of a pixel the flow already knows (the
black background of a digit) is U[0, 1/256), and the best Gaussian for a box of width h costs
0.5 ln(2 pi e / 12) = 0.176 nats (0.25 bits) more than the box's own entropy, per such pixel. A learned
monotone rational-quadratic spline per channel (Durkan et al. 2019, zuko's implementation), shared over
positions, can stretch those boxes into bell shapes the affine steps fit. It is a bijection with an
exact, elementwise log-determinant, so likelihoods stay exact; it starts as the identity (zero logits),
so a trained flow can be fine-tuned with one added. Outside [-bound, bound] it is the identity.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from zuko.transforms import MonotonicRQSTransform


class InputSpline(nn.Module):
    def __init__(self, channels: int, bins: int, bound: float = 1.0):
        super().__init__()
        self.bound = bound
        self.widths = nn.Parameter(torch.zeros(channels, bins))
        self.heights = nn.Parameter(torch.zeros(channels, bins))
        self.derivatives = nn.Parameter(torch.zeros(channels, bins - 1))

    def _transform(self, dtype: torch.dtype) -> MonotonicRQSTransform:
        # [C, K] -> [C, 1, 1, K]: one spline per channel, broadcast over the image's rows and columns
        def param(p):
            return p.to(dtype)[:, None, None, :]

        return MonotonicRQSTransform(param(self.widths), param(self.heights), param(self.derivatives), bound=self.bound)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Data x [B, C, H, W] -> (the flow's input, log|det| per example [B])."""
        y, ladj = self._transform(x.dtype).call_and_ladj(x)
        return y, ladj.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self._transform(y.dtype).inv(y)
