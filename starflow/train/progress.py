"""Training progress a person can read: a tqdm bar in a terminal, plain periodic lines otherwise (a log
file, a pipe, a notebook cell, CI), so a run is never silent."""
from __future__ import annotations

import math
import sys
import time

from tqdm import tqdm

# Plain lines at most this often (seconds); the first and the last logged step always print.
LINE_INTERVAL_S = 10.0


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``update`` after every step, ``logged`` after a step that produced a log record."""

    def __init__(self, total: int, initial: int, enabled: bool, flow: bool, pixel: bool, stream=None,
                 interval_s: float = LINE_INTERVAL_S):
        stream = stream if stream is not None else sys.stderr
        self.terminal = enabled and stream.isatty()
        self.lines = enabled and not self.terminal
        self.total, self.initial = total, initial
        self.flow = flow  # a flow's loss is its NLL in nats/dim; the peers' losses have no such unit
        self.pixel_flow = flow and pixel  # nats/dim of [-1,1] pixels: bits/dim = loss/ln2 + 7
        self.interval_s = interval_s
        self.start = time.time()
        self.last_line = -math.inf
        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, disable=not self.terminal,
                        file=stream)

    def update(self) -> None:
        self.bar.update(1)

    def logged(self, step: int, rec: dict) -> None:
        loss, ips = rec.get("loss", float("nan")), rec.get("images_per_s", float("nan"))
        if self.terminal:
            self.bar.set_postfix(loss=f"{loss:.4f}", ips=f"{ips:.0f}")
            return
        now = time.time()
        if not self.lines or (now - self.last_line < self.interval_s and step != self.total
                              and self.last_line > -math.inf):
            return
        self.last_line = now
        done = step - self.initial
        eta = (now - self.start) / done * (self.total - step) if done > 0 else float("nan")
        unit = f"loss {loss:.4f}" + (" nats/dim" if self.flow else "")
        if self.pixel_flow:
            unit += f" ({loss / math.log(2) + 7:.3f} bits/dim, noisy training batch)"
        print(f"step {step}/{self.total}  {unit}  {ips:.1f} images/s  ETA {format_eta(eta)}", flush=True)

    def close(self) -> None:
        self.bar.close()
