"""The samplers' names (the one list the CLI and the options checks read) and the typed sampler
components a pipeline holds, like a diffusers scheduler: ``FlowSampler`` for STARFlow (how each flow block
is inverted) and ``EulerSampler`` for the rectified flow and FlowAR (the Euler integration). Free of
imports beyond the standard library, so every ``--help`` can list them without importing torch.

The per-block plan samplers (selective, segment, auto) are resolved to per-block choices in
``starflow.flow.selective_jacobi``; chunked-jacobi (the official STARFlow rule) is
``starflow.flow.chunked_jacobi``; the others are in ``starflow.flow.sampling``."""
from __future__ import annotations

from dataclasses import dataclass, replace

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


def check_shift(shift) -> float:
    """A static shift alpha of the sigma grid: a finite number > 0."""
    if isinstance(shift, bool) or not (isinstance(shift, (int, float)) and 0 < shift < float("inf")):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    return float(shift)


@dataclass(frozen=True)
class EulerSampler:
    """Euler integration from noise to data. ``steps``: None for the model's ``sample_steps`` (FlowAR also
    takes one count per scale); ``schedule`` (rectified flow): the sigma grid, None for the model's;
    ``shift`` (rectified flow): the grid's static shift alpha (SD3's ``shift``), None for the model's;
    ``mu`` (rectified flow): dynamic shifting instead; ``backend``: one of ``EULER_SAMPLERS``."""
    steps: int | tuple[int, ...] | None = None
    schedule: str | None = None
    mu: float | None = None
    backend: str = "euler"
    shift: float | None = None

    # The keyword form of each field, as the models' ``sample`` takes it (the same names).
    KEYWORDS = ("steps", "schedule", "mu", "shift")

    def __post_init__(self):
        if self.backend not in EULER_SAMPLERS:
            raise ValueError(f"unknown sampler {self.backend!r}; choose one of {EULER_SAMPLERS}")
        steps = self.steps if isinstance(self.steps, tuple) else (self.steps,)
        if any(s is not None and (not isinstance(s, int) or s < 1) for s in steps):
            raise ValueError(f"steps must be integers >= 1, got {self.steps!r}")
        if self.shift is not None:
            check_shift(self.shift)
        if self.shift is not None and self.mu is not None:
            raise ValueError("give a static shift or dynamic shifting (mu), not both")

    def overridden_by(self, call_kwargs: dict) -> "EulerSampler":
        """This sampler with the fields a call sets as keywords (``steps=``, ``shift=``, ...) taking their
        place; those keywords are removed from ``call_kwargs``. How a pipeline's sampler component meets a
        call's own choices, as a diffusers scheduler meets ``num_inference_steps``."""
        given = {k: call_kwargs.pop(k) for k in self.KEYWORDS if call_kwargs.get(k) is not None}
        if "shift" in given and "mu" not in given:  # a static shift replaces the component's dynamic one
            given["mu"] = None
        if "mu" in given and "shift" not in given:
            given["shift"] = None
        return replace(self, **given)
