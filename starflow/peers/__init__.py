"""Peer systems on the STARFlow harness: SD3 rectified flow (MM-DiT) and FlowAR.

Both follow the harness interface: a dataclass config, `PretrainedMixin` save/load, and
`loss(x, y=None, text=None)`, `sample(n, y=None, text=None, guidance=0.0, steps=..., generator=None,
device=None)`, `num_params()`. Neither has an exact likelihood: `nll` raises NotImplementedError.
Time convention for both: t = 0 data, t = 1 noise (see rectified_flow.py).
"""
from starflow.peers.flowar import FlowAR, FlowARConfig
from starflow.peers.mmdit import MMDiT
from starflow.peers.rectified_flow import (RectifiedFlow, RectifiedFlowConfig, TimestepSampler, euler_sample,
                                           guided, interpolate, shift_timesteps, velocity_target)

__all__ = [
    "FlowAR", "FlowARConfig", "MMDiT", "RectifiedFlow", "RectifiedFlowConfig", "TimestepSampler",
    "euler_sample", "guided", "interpolate", "shift_timesteps", "velocity_target",
]
