"""Scoring an edit with the ShapesEval detector: which single change happened, and did the rest stay."""
from __future__ import annotations

import math

import numpy as np

from starflow.data.shapes import (REFERENCE_SIZE)
from starflow.evaluation.shapes_detect import as_float_image, detect_objects
from starflow.data.edits import Instruction, MOVE_PX, TOL_PX, parse_instruction

# ---------------------------------------------------------------------------------------------------
# Scoring with the ShapesEval detector
# ---------------------------------------------------------------------------------------------------


def _match(a, b, tol: float):
    """Match detections a <-> b of the same shape and colour within ``tol`` px (optimal assignment).
    Returns (pairs, unmatched a indices, unmatched b indices)."""
    from scipy.optimize import linear_sum_assignment

    if not a or not b:
        return [], list(range(len(a))), list(range(len(b)))
    big = 1e6
    cost = np.full((len(a), len(b)), big)
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            if p.shape == q.shape and p.colour == q.colour:
                d = math.hypot(p.centre[0] - q.centre[0], p.centre[1] - q.centre[1])
                if d <= tol:
                    cost[i, j] = d
    rows, cols = linear_sum_assignment(cost)
    pairs = [(i, j) for i, j in zip(rows, cols) if cost[i, j] < big]
    ma, mb = {i for i, _ in pairs}, {j for _, j in pairs}
    return pairs, [i for i in range(len(a)) if i not in ma], [j for j in range(len(b)) if j not in mb]


def infer_edit(source_image, edited_image, tol_px: float = TOL_PX) -> Instruction | None:
    """The single edit that turns the objects detected in ``source_image`` into those detected in
    ``edited_image`` (``tol_px`` at 32 px, scaled with the image size), or None if the difference is not
    exactly one recolour / remove / add / move (or an object is undetectable / of unknown shape)."""
    h = as_float_image(source_image).shape[0]
    scale = h / REFERENCE_SIZE
    src, dst = detect_objects(source_image), detect_objects(edited_image)
    if any(d.shape == "unknown" for d in src + dst):
        return None
    _, ua, ub = _match(src, dst, tol_px * scale)
    A, B = [src[i] for i in ua], [dst[j] for j in ub]
    if len(A) == 1 and not B:
        return Instruction("remove", A[0].shape)
    if len(B) == 1 and not A:
        return Instruction("add", B[0].shape, colour=B[0].colour)
    if len(A) == 1 and len(B) == 1 and A[0].shape == B[0].shape:
        a, b = A[0], B[0]
        dx, dy = (b.centre[0] - a.centre[0]) / scale, (b.centre[1] - a.centre[1]) / scale
        if a.colour != b.colour and math.hypot(dx, dy) <= tol_px:
            return Instruction("recolour", a.shape, colour=b.colour)
        if a.colour == b.colour:
            along, across = (dx, dy) if abs(dx) >= abs(dy) else (dy, dx)
            if abs(along) >= MOVE_PX / 2 and abs(across) <= MOVE_PX / 2:
                direction = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
                return Instruction("move", a.shape, direction=direction)
    return None


def score_edit(source_image, edited_image, instruction, tol_px: float = TOL_PX) -> dict:
    """Did the edit happen? ``passed``: the detected change is exactly ``instruction`` (Instruction or text).
    ``rest_ok``: every source object other than the edited one is still detected unchanged."""
    ins = parse_instruction(instruction) if isinstance(instruction, str) else instruction
    got = infer_edit(source_image, edited_image, tol_px)
    h = as_float_image(source_image).shape[0]
    src, dst = detect_objects(source_image), detect_objects(edited_image)
    keep = [d for d in src if not (ins.kind != "add" and d.shape == ins.shape)]
    _, unmatched, _ = _match(keep, dst, tol_px * h / REFERENCE_SIZE)
    return {"passed": got == ins, "detected": None if got is None else got.text, "rest_ok": not unmatched}
