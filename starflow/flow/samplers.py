"""The samplers' names (the one list the CLI and the options checks read) and the typed sampler
components a pipeline holds, like a diffusers scheduler: ``FlowSampler`` for STARFlow (how each flow block
is inverted) and ``EulerSampler`` for the rectified flow and FlowAR (the Euler integration). Free of
imports beyond the standard library, so every ``--help`` can list them without importing torch.

The per-block plan samplers (selective, segment, auto) are resolved to per-block choices in
``starflow.flow.selective_jacobi``; chunked-jacobi (the official STARFlow rule) is
``starflow.flow.chunked_jacobi``; the others are in ``starflow.flow.sampling``."""
from __future__ import annotations

from dataclasses import dataclass

SAMPLERS = ("sequential", "jacobi", "naive", "chunked-jacobi", "selective", "segment", "auto")
EULER_SAMPLERS = ("euler", "diffusers")  # the Euler loop: starflow's own, or diffusers' scheduler


@dataclass(frozen=True)
class FlowSampler:
    """How STARFlow inverts its blocks. ``kind``: one of ``SAMPLERS``; ``threshold``: the change below which a
    Jacobi window stops; ``window``: Jacobi window / chunk length (0: the whole block; 16 for chunked-jacobi);
    ``max_iters``: sweep cap (0: the window length; 32 for chunked-jacobi); ``plan``: per-block choices
    (e.g. ``("jacobi", "sequential")``); ``tolerance``: the calibrated plans' required tightness."""
    kind: str = "sequential"
    threshold: float = 1e-3
    window: int = 0
    max_iters: int = 0
    plan: tuple[str, ...] | None = None
    tolerance: float | None = None

    def __post_init__(self):
        if self.kind not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.kind!r}; expected one of {', '.join(SAMPLERS)}")
        if not self.threshold > 0:
            raise ValueError(f"jacobi threshold must be > 0, got {self.threshold}")
        if self.window < 0 or self.max_iters < 0:
            raise ValueError("jacobi window and max iterations must be >= 0")

    def inverse_kwargs(self) -> dict:
        """The keyword form ``STARFlow.inverse`` takes."""
        out = dict(sampler=self.kind, jacobi_threshold=self.threshold, jacobi_window=self.window,
                   jacobi_max_iters=self.max_iters)
        if self.plan is not None:
            out["plan"] = list(self.plan)
        if self.tolerance is not None:
            out["tolerance"] = self.tolerance
        return out


@dataclass(frozen=True)
class EulerSampler:
    """Euler integration from noise to data. ``steps``: None for the model's ``sample_steps`` (FlowAR also
    takes one count per scale); ``schedule`` (rectified flow): the sigma grid, None for the model's;
    ``mu`` (rectified flow): dynamic shifting; ``backend``: one of ``EULER_SAMPLERS``."""
    steps: int | tuple[int, ...] | None = None
    schedule: str | None = None
    mu: float | None = None
    backend: str = "euler"

    def __post_init__(self):
        if self.backend not in EULER_SAMPLERS:
            raise ValueError(f"unknown sampler {self.backend!r}; choose one of {EULER_SAMPLERS}")
        steps = self.steps if isinstance(self.steps, tuple) else (self.steps,)
        if any(s is not None and (not isinstance(s, int) or s < 1) for s in steps):
            raise ValueError(f"steps must be integers >= 1, got {self.steps!r}")
