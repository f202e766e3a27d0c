"""Per-block sampling plans: selective Jacobi, segment-wise Jacobi and ``auto``, from a stored calibration.

A plan says, for every flow block, how to invert it: the cached ``sequential`` decoder, or Jacobi
iterations over windows (segments) of ``window`` tokens (0 = the whole block at once).

* ``selective``: each block is sequential or whole-block Jacobi. Without a calibration the rule of
  selective Jacobi decoding applies: the block sampled first (it acts on pure noise; in a deep-shallow
  stack it is also the deep block) stays sequential, the others run Jacobi.
* ``segment``: every block runs Jacobi; blocks that converge slowly ("tough" blocks) are split into
  segments. Needs a calibration.
* ``auto``: any mix, the fastest that meets the calibrated tolerance for this device and batch size;
  sequential when the model has no calibration for this device.

The calibration (``calibrate``) maps a few hundred training images to their exact noise, times every
(block, choice) pair on this device at each batch size, measures how far each choice moves the final
samples from the sequential ones, and keeps, per batch size, plans whose end-to-end error on the
calibration set was measured to be within the tolerance. It is saved as a small JSON file next to the
model's weights and loaded with the model. Timings are the device's own, so a file may hold one calibration
per device (``merge_calibrations``): ``auto`` uses the one measured on the device it samples on.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

from starflow.flow.sampling import SamplerOptions, invert_block

PLAN_SAMPLERS = ("selective", "segment", "auto")
CALIBRATION_NAME = "sampling_calibration.json"
SEQUENTIAL = "sequential"


def choice_key(mode: str, window: int = 0) -> str:
    """'sequential', 'jacobi' (whole block) or 'jacobi:K' (segments of K tokens)."""
    return mode if mode == SEQUENTIAL or not window else f"{mode}:{window}"


def block_options(key: str, base: SamplerOptions) -> SamplerOptions:
    """The per-block sampler options a plan entry stands for (threshold and cap from ``base``)."""
    if key == SEQUENTIAL:
        return dataclasses.replace(base, sampler=SEQUENTIAL)
    mode, _, window = key.partition(":")
    if mode != "jacobi":
        raise ValueError(f"unknown plan entry {key!r}")
    return dataclasses.replace(base, sampler="jacobi", jacobi_window=int(window or 0))


def default_selective(num_blocks: int) -> list[str]:
    """Sequential for the block sampled first (index T-1), whole-block Jacobi for the others."""
    return ["jacobi"] * (num_blocks - 1) + [SEQUENTIAL]


def segment_windows(num_tokens: int) -> list[int]:
    """Candidate segment lengths for tough blocks: a half and a quarter of the block."""
    return sorted({max(1, math.ceil(num_tokens / 2)), max(1, math.ceil(num_tokens / 4))}, reverse=True)


@dataclass
class Calibration:
    threshold: float                  # Jacobi stopping threshold the figures were measured with
    tolerance: float                  # max |dx| from the sequential samples a stored plan may have
    num_images: int
    device: str                       # "cpu" or the CUDA device name
    choices: list[str]
    block_error: list[dict[str, float]]            # [block][choice]: end-to-end max|dx| with only that block changed
    block_sweeps: list[dict[str, float]]           # [block][choice]: mean Jacobi sweeps per window
    times: dict[str, list[dict[str, float]]]       # batch -> [block][choice] seconds
    plans: dict[str, dict[str, dict]] = field(default_factory=dict)  # batch -> sampler -> {plan, error, seconds}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def nearest_batch(self, batch: int) -> str:
        return min(self.plans, key=lambda b: (abs(math.log(int(b)) - math.log(batch)), int(b)))


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


Calibrations = Calibration | list[Calibration]  # one per device a model was calibrated on


def calibration_list(cal: Calibrations | None) -> list[Calibration]:
    """The stored calibrations as a list (none, one, or one per device)."""
    return [] if cal is None else list(cal) if isinstance(cal, list) else [cal]


def merge_calibrations(existing: Calibrations | None, new: Calibration) -> Calibrations:
    """``existing`` with ``new`` in place of any calibration of the same device (the others are kept)."""
    kept = [c for c in calibration_list(existing) if c.device != new.device]
    return kept + [new] if kept else new


def save_calibration(cal: Calibrations, directory: str) -> str:
    """One calibration as its own JSON object; several as ``{"calibrations": [...]}``."""
    path = os.path.join(directory, CALIBRATION_NAME)
    cals = calibration_list(cal)
    text = cals[0].to_json() if len(cals) == 1 else \
        json.dumps({"calibrations": [dataclasses.asdict(c) for c in cals]}, indent=1)
    with open(path, "w") as f:
        f.write(text)
    return path


def load_calibration(directory: str) -> Calibrations | None:
    path = os.path.join(directory, CALIBRATION_NAME)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            d = json.load(f)
            if "calibrations" in d:
                return [Calibration.from_dict(c) for c in d["calibrations"]]
            return Calibration.from_dict(d)
        except (json.JSONDecodeError, TypeError, AttributeError) as e:
            raise ValueError(f"corrupt sampling calibration {path}: {e}") from e


def resolve_plan(sampler: str, num_blocks: int, cal: Calibrations | None, batch: int, device,
                 tolerance: float | None = None) -> tuple[list[str], float | None]:
    """The per-block plan (index = block index) a plan sampler uses for this batch size and device, and
    the Jacobi threshold it was calibrated with (None: the caller's threshold applies). ``selective`` and
    ``segment`` may use another device's calibration (their plans depend on errors, which do not depend on
    the device, more than on timings); ``auto`` only this device's."""
    if sampler not in PLAN_SAMPLERS:
        raise ValueError(f"{sampler!r} is not a plan sampler ({', '.join(PLAN_SAMPLERS)})")
    cals = calibration_list(cal)
    here = next((c for c in cals if c.device == device_name(device)), None)
    cal = here or (cals[0] if cals else None)
    usable = cal is not None and bool(cal.plans) and (tolerance is None or tolerance >= cal.tolerance)
    if sampler == "auto":
        if not usable or here is None:
            return [SEQUENTIAL] * num_blocks, None  # nothing measured here: the exact sampler
        return list(cal.plans[cal.nearest_batch(batch)]["auto"]["plan"]), cal.threshold
    if not usable:
        if sampler == "segment":
            raise ValueError("the segment sampler needs a sampling calibration (see starflow.flow.selective_jacobi.calibrate)")
        return default_selective(num_blocks), None
    return list(cal.plans[cal.nearest_batch(batch)][sampler]["plan"]), None


# ---- calibration ------------------------------------------------------------------------------
def _invert_from(model, h, top: int, plan, base: SamplerOptions, pos, cond, iterations=None):
    """Invert blocks top..0 of the stack (tokens h [B, L, D]) with the plan's per-block choices, unguided.
    Returns the inputs each block received (index = block index; None above ``top``) and the output."""
    inputs = [None] * len(model.blocks)
    for b in range(top, -1, -1):
        block = model.blocks[b]
        inputs[b] = h
        ctx = block.context(cond if block.conditional else None, h.shape[0], h.device, pos)
        h = invert_block(block, h, ctx, None, block_options(plan[b], base), None if iterations is None else iterations[b])
    return inputs, h


def _time_block(model, b, h, pos, cond, opts, repeats):
    block = model.blocks[b]
    sync = torch.cuda.synchronize if h.is_cuda else (lambda: None)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        sync()
        t = time.perf_counter()
        ctx = block.context(cond if block.conditional else None, h.shape[0], h.device, pos)
        invert_block(block, h, ctx, None, opts, [])
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def _cond_rows(cond_kw, s, e):
    """Rows s..e-1 of the condition arguments (labels, or a (states, mask) pair)."""
    return {k: (v[s:e] if torch.is_tensor(v) else tuple(t[s:e] for t in v)) for k, v in cond_kw.items()}


@torch.no_grad()
def calibrate(model, images: torch.Tensor, tolerance: float = 1e-3, threshold: float = 1e-3,
              batches=(1, 8, 32, 64), chunk: int = 64, repeats: int = 2, **cond_kw) -> Calibration:
    """Measure every (block, choice) pair on ``images`` (model space, in-distribution) and store, per
    batch size, the fastest selective / segment / auto plans whose end-to-end max|dx| from the sequential
    samples over all of ``images`` is within ``tolerance``. ``cond_kw``: ``y=`` labels or ``text=``."""
    model.eval()
    N, L, T = images.shape[0], model.config.num_tokens, len(model.blocks)
    z = model(images, **cond_kw)[0]
    base = SamplerOptions(jacobi_threshold=threshold)
    choices = [SEQUENTIAL, "jacobi"] + [choice_key("jacobi", w) for w in segment_windows(L)]

    # Sequential pass over the set, in chunks: every block's input and the reference output.
    all_sequential = [SEQUENTIAL] * T
    pos = model.positions(model.check_input(z), z.device)
    chunks = []
    for s in range(0, N, chunk):
        cond = model.make_condition(min(chunk, N - s), device=z.device, **_cond_rows(cond_kw, s, s + chunk))
        inputs, out = _invert_from(model, model.patchify(z[s:s + chunk]), T - 1, all_sequential, base, pos, cond)
        chunks.append((inputs, out, cond))

    def run(plan):
        """Max |dx| of a plan from the sequential samples over the calibration set, and mean sweeps per
        block. Blocks above the first non-sequential one match the reference, so it starts there."""
        top = max((b for b, c in enumerate(plan) if c != SEQUENTIAL), default=-1)
        if top < 0:
            return 0.0, [0.0] * T
        err, sweeps = 0.0, [[] for _ in range(T)]
        for inputs, ref, cond in chunks:
            its = [[] for _ in range(T)]
            _, out = _invert_from(model, inputs[top], top, plan, base, pos, cond, its)
            d = (out - ref).abs().max().item()  # tokens: the same numbers as the image's pixels
            err = max(err, d if math.isfinite(d) else math.inf)  # a diverged Jacobi run (NaN) never passes
            for b in range(T):
                sweeps[b].extend(its[b])
        return err, [sum(v) / len(v) if v else 0.0 for v in sweeps]

    block_error = [{SEQUENTIAL: 0.0} for _ in range(T)]
    block_sweeps = [{SEQUENTIAL: 0.0} for _ in range(T)]
    for b in range(T):
        for c in choices[1:]:
            plan = [SEQUENTIAL] * T
            plan[b] = c
            block_error[b][c], sw = run(plan)
            block_sweeps[b][c] = sw[b]

    times = {}
    for B in batches:
        Bn = min(B, N)
        kw = _cond_rows(cond_kw, 0, Bn)
        cond = model.make_condition(Bn, device=z.device, **kw)
        inputs, _ = _invert_from(model, model.patchify(z[:Bn]), T - 1, all_sequential, base, pos, cond)
        times[str(B)] = [{c: _time_block(model, b, inputs[b], pos, cond, block_options(c, base), repeats)
                          for c in choices} for b in range(T)]

    cal = Calibration(threshold, tolerance, N, device_name(z.device), choices, block_error, block_sweeps, times)
    verified: dict[tuple, float] = {}
    for B in batches:
        t = times[str(B)]
        cal.plans[str(B)] = {
            "selective": _best_plan([[SEQUENTIAL, "jacobi"]] * T, t, block_error, tolerance, run, verified),
            "segment": _best_plan([choices[1:]] * T, t, block_error, tolerance, run, verified),
            "auto": _best_plan([choices] * T, t, block_error, tolerance, run, verified),
        }
    return cal


def _best_plan(allowed, times, block_error, tolerance, run, verified) -> dict:
    """Per block the fastest allowed choice whose own error is within tolerance; then check the whole
    plan on the calibration set and, while it misses, make the block with the largest error exact
    (sequential). Sequential always meets any tolerance (it is the reference)."""
    plan = []
    for b, ok in enumerate(allowed):
        good = [c for c in ok if block_error[b][c] <= tolerance] or [SEQUENTIAL]
        plan.append(min(good, key=lambda c: times[b][c]))
    while True:
        key = tuple(plan)
        if key not in verified:
            verified[key] = 0.0 if all(c == SEQUENTIAL for c in plan) else run(list(plan))[0]
        if verified[key] <= tolerance:
            break
        worst = max((b for b, c in enumerate(plan) if c != SEQUENTIAL), key=lambda b: block_error[b][plan[b]])
        plan[worst] = SEQUENTIAL
    return {"plan": plan, "error": verified[key], "seconds": sum(times[b][c] for b, c in enumerate(plan))}
