"""Training and benchmark figures as PNG files (matplotlib, Agg backend: no display needed).

    from starflow.evaluation.plots import plot_run
    paths, notes = plot_run("runs/mnist_starflow", "runs/mnist_starflow/plots")

or ``starflow plot RUN_DIR [--out DIR]``. What a run directory gives:

* ``log.jsonl`` (written by the trainer): one JSON object per line. *Step lines* have ``step``, ``loss``
  (mean training loss, nats/dim), ``grad_norm``, ``lr``, ``images_per_s``; *event lines* have ``step``
  and ``event`` (``skipped``, ``rollback``, ...). A line may also carry ``fd`` (a number, or an object
  with ``value``) from an evaluation during training. A half-written last line (a run in progress) is
  skipped.
* ``eval/*.json`` (optional): ``starflow eval`` reports (schema ``starflow.eval/1``); each one with an
  ``fd`` metric gives one FD point, its step taken from a top-level ``step`` or from ``step_NNNNNNN``
  in its ``checkpoint`` path. Their ``real_baseline`` (the FD of real training images at the same
  sample counts) is drawn as a dashed line.
* ``samples/step_NNNNNNN.png``: the trainer's sample grids (fixed seed), shown side by side.
* the run's train config, read from ``model/train_config.yaml`` or the newest
  ``checkpoints/step_*/manifest.json``: it says whether the run is in pixel or latent space and the
  noise augmentation ``noise_std``.

Bits/dim. For a *pixel* run the loss is the NLL in nats/dim of dequantised images scaled to [-1, 1], so
bits/dim = loss / ln 2 + 7 (``starflow.data.spaces``). That is the training-batch bits/dim of the data the model was
fit to; with Gaussian noise augmentation (``noise_std`` > 0) the data are noisier than the 8-bit images,
so the figure says so and the number is not the test bits/dim of clean images (``starflow eval``
measures that). A *latent* run has no pixel bits/dim: only nats/dim of the (noisy) latents is drawn.

Outputs of :func:`plot_run`: ``training_curves.png`` (loss, bits/dim for pixel runs, gradient norm,
learning rate, throughput; events marked), ``fd.png`` (when FD points exist) and
``samples_over_training.png`` (when sample grids exist).
"""
from __future__ import annotations

import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from starflow.data.spaces import bits_per_dim  # noqa: E402
from starflow.evaluation.run_files import fd_points, read_log, run_info, sample_grids  # noqa: E402

MAX_SHEET = 12  # sample grids on the contact sheet (evenly spaced, first and last kept)
EVENT_COLOURS = {"rollback": "tab:red", "skipped": "tab:orange"}


# ---------------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------------
def _series(records, key):
    xs = [r["step"] for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    ys = [r[key] for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return np.array(xs), np.array(ys, dtype=float)


def _mark_events(ax, events):
    seen = set()
    for e in events:
        kind = e.get("event", "event")
        ax.axvline(e["step"], color=EVENT_COLOURS.get(kind, "tab:gray"), lw=0.8, ls=":",
                   label=kind if kind not in seen else None)
        seen.add(kind)


def curves(records: list[dict], info: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The series the training figure draws: panel -> (steps, values). ``bpd`` only for pixel runs."""
    out = {"loss": _series(records, "loss")}
    if info.get("space") == "pixel":
        steps, loss = out["loss"]
        out["bpd"] = (steps, bits_per_dim(loss))
    for key in ("grad_norm", "lr", "images_per_s"):
        out[key] = _series(records, key)
    return out


def plot_training_curves(records: list[dict], events: list[dict], info: dict, out_png: str,
                         title: str = "") -> list[str]:
    """The training-curves figure; returns notes on what it shows."""
    notes = []
    series = curves(records, info)
    if not len(series["loss"][0]):
        raise ValueError("the log has no step lines with a loss")
    pixel = "bpd" in series
    panels = list(series)
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.3 * len(panels)), sharex=True)
    noise = info.get("noise_std") or 0.0
    for ax, panel in zip(axes, panels):
        s, v = series[panel]
        if panel == "loss":
            ax.plot(s, v, lw=1.2, color="tab:blue")
            space = {"pixel": "pixels in [-1, 1]", "latent": "latents"}.get(info.get("space"), "model space")
            ax.set_ylabel("loss\n(nats/dim)")
            ax.set_title(f"training loss: NLL of {space}" + (f", noise σ={noise:g}" if noise else ""), fontsize=9)
        elif panel == "bpd":
            ax.plot(s, v, lw=1.2, color="tab:purple")
            ax.set_ylabel("bits/dim")
            caveat = (f"training batches with noise σ={noise:g} added: not the clean-image test bits/dim"
                      if noise else "training batches, uniform dequantisation")
            ax.set_title(f"bits/dim = loss/ln2 + 7\n({caveat})", fontsize=9)
            notes.append(f"bits/dim = loss/ln2 + 7 (pixel run; {caveat})")
        else:
            if len(s):
                ax.plot(s, v, lw=1.0, color="tab:green" if panel != "lr" else "tab:brown")
            else:
                ax.text(0.5, 0.5, f"no {panel} in the log", ha="center", va="center", transform=ax.transAxes)
            ax.set_ylabel({"grad_norm": "grad norm\n(pre-clip)", "lr": "learning\nrate",
                           "images_per_s": "images/s"}[panel])
        _mark_events(ax, events)
        ax.grid(alpha=0.3)
    if events:
        axes[0].legend(fontsize=7, loc="upper right")
    if not pixel:
        notes.append("no bits/dim panel: " + ("latent-space run (nats/dim of latents only)"
                                              if info.get("space") == "latent" else
                                              "pixel or latent space unknown (pass --space pixel for a pixel run)"))
    axes[-1].set_xlabel("step")
    fig.suptitle(title or "training", fontsize=11)
    fig.tight_layout()
    _save(fig, out_png)
    return notes


def plot_fd(points, baseline, name: str, out_png: str, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    s, v = zip(*points)
    ax.plot(s, v, "o-", color="tab:red", label=f"{name} of samples")
    if baseline is not None:
        ax.axhline(baseline, color="k", ls="--", lw=1, label=f"real training images ({baseline:.3g})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{name} (lower is better)")
    ax.set_title(title or f"{name} over training", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out_png)


def plot_sample_sheet(grids: list[tuple[int, str]], out_png: str, title: str = "", max_panels: int = MAX_SHEET) -> int:
    """Sample grids side by side, labelled by step; at most ``max_panels`` (evenly spaced). Returns the count."""
    if not grids:
        raise ValueError("no sample grids")
    if len(grids) > max_panels:
        idx = np.unique(np.linspace(0, len(grids) - 1, max_panels).round().astype(int))
        grids = [grids[i] for i in idx]
    cols = min(len(grids), 4)
    rows = math.ceil(len(grids) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, (step, path) in zip(axes.flat, grids):
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L") if im.mode in ("L", "1") else im.convert("RGB"))
        ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, interpolation="nearest", vmin=0, vmax=255)
        ax.set_title(f"step {step}", fontsize=9)
    fig.suptitle(title or "samples over training (fixed seed)", fontsize=11)
    _save(fig, out_png)
    return len(grids)


def _save(fig, out_png: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def plot_run(run_dir: str, out_dir: str | None = None, space: str = "auto") -> tuple[list[str], list[str]]:
    """All figures of a training run. ``space``: auto (from the run's config), pixel or latent.
    Returns (written PNG paths, notes)."""
    if space not in ("auto", "pixel", "latent"):
        raise ValueError(f"space must be auto, pixel or latent, got {space!r}")
    log = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(log):
        raise FileNotFoundError(f"{log} does not exist (is {run_dir!r} a training run directory?)")
    out_dir = out_dir or os.path.join(run_dir, "plots")
    records, events, bad = read_log(log)
    info = run_info(run_dir)
    notes = []
    if space != "auto":
        if info["space"] not in ("unknown", space):
            notes.append(f"--space {space} overrides the run's config ({info['space']}, {info['source']})")
        info["space"] = space
    if bad:
        notes.append(f"{bad} unreadable line(s) in {log} skipped")
    name = os.path.basename(os.path.normpath(run_dir))
    paths = []
    if any("loss" in r for r in records):
        p = os.path.join(out_dir, "training_curves.png")
        notes += plot_training_curves([r for r in records if "loss" in r], events, info, p, title=name)
        paths.append(p)
    else:
        notes.append("no loss lines in the log yet")
    pts, baseline, fd_name = fd_points(run_dir, records)
    if pts:
        p = os.path.join(out_dir, "fd.png")
        plot_fd(pts, baseline, fd_name, p, title=f"{name}: {fd_name} over training")
        paths.append(p)
    else:
        notes.append("no FD points (none in log.jsonl or eval/*.json): fd.png not written")
    grids = sample_grids(run_dir)
    if grids:
        p = os.path.join(out_dir, "samples_over_training.png")
        k = plot_sample_sheet(grids, p, title=f"{name}: samples over training (fixed seed)")
        if k < len(grids):
            notes.append(f"contact sheet shows {k} of {len(grids)} sample grids")
        paths.append(p)
    else:
        notes.append("no samples/step_*.png grids: contact sheet not written")
    return paths, notes


# ---------------------------------------------------------------------------------------------------
# benchmark figures
# ---------------------------------------------------------------------------------------------------
def _load(json_path: str, schema: str) -> dict:
    with open(json_path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{json_path}: expected a JSON object")
    if data.get("schema", schema) != schema:
        raise ValueError(f"{json_path}: schema is {data.get('schema')!r}, expected {schema!r}")
    return data


def plot_guidance_sweep(json_path: str, out_png: str) -> str:
    """Metric(s) against the guidance weight w, one line per guidance rule.

    JSON schema (``schema: "starflow.guidance_sweep/1"``)::

        {
          "schema": "starflow.guidance_sweep/1",
          "title": str,                                   # optional
          "model": str,                                   # optional, shown in the title
          "metrics": {"<name>": {"label": str, "lower_is_better": bool}},   # optional, per metric
          "rows": [
            {"rule": "starflow" | "tarflow" | "tarflow-annealed", "guidance": float,
             "<name>": float, "<name>_ci95": [lo, hi] (optional), ...}
          ]
        }

    Every numeric key of a row other than ``guidance`` is a metric (e.g. ``fd``, ``accuracy``,
    ``shapes_eval``); each metric gets one panel. A row may omit a metric (a diverged run: plotted as a
    gap, not a zero)."""
    data = _load(json_path, "starflow.guidance_sweep/1")
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{json_path}: no rows")
    meta = data.get("metrics") or {}
    metrics = []
    for r in rows:
        if "rule" not in r or not isinstance(r.get("guidance"), (int, float)):
            raise ValueError(f"{json_path}: every row needs 'rule' and a numeric 'guidance': {r}")
        for k, v in r.items():
            if k not in ("rule", "guidance") and not k.endswith("_ci95") and isinstance(v, (int, float)) \
                    and not isinstance(v, bool) and k not in metrics:
                metrics.append(k)
    if not metrics:
        raise ValueError(f"{json_path}: rows carry no numeric metric")
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        m = meta.get(metric, {})
        for rule in rules:
            rr = sorted((r for r in rows if r["rule"] == rule), key=lambda r: r["guidance"])
            w = np.array([r["guidance"] for r in rr], float)
            v = np.array([r.get(metric, np.nan) if r.get(metric) is not None else np.nan for r in rr], float)
            line, = ax.plot(w, v, "o-", label=rule)
            ci = [r.get(f"{metric}_ci95") for r in rr]
            if all(isinstance(c, (list, tuple)) and len(c) == 2 for c in ci):
                ax.fill_between(w, [c[0] for c in ci], [c[1] for c in ci], color=line.get_color(), alpha=0.15)
        label = m.get("label", metric)
        if "lower_is_better" in m:
            label += " (lower is better)" if m["lower_is_better"] else " (higher is better)"
        ax.set_xlabel("guidance weight w")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="rule", title_fontsize=8)
    title = data.get("title") or "guidance sweep" + (f": {data['model']}" if data.get("model") else "")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, out_png)
    return out_png


def plot_model_comparison(json_path: str, out_png: str) -> str:
    """Quality against sampling speed, one point per system (the model-comparison figure).

    JSON schema (``schema: "starflow.model_comparison/1"``)::

        {
          "schema": "starflow.model_comparison/1",
          "title": str,                        # optional
          "quality_metric": str,               # e.g. "FD-EffNetLite0"
          "lower_is_better": bool,             # for the quality metric (default true)
          "device": str,                       # where images/s was measured, e.g. "2-core CPU"
          "batch_size": int,                   # optional, the sampling batch for images/s
          "models": [
            {"name": str, "images_per_s": float, "quality": float,
             "quality_ci95": [lo, hi],         # optional
             "params": int,                    # optional, shown in the label (M parameters)
             "family": str}                    # optional, one colour per family (e.g. "starflow", "peer")
          ]
        }

    images/s goes on a log axis; an arrow marks the better corner."""
    data = _load(json_path, "starflow.model_comparison/1")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ValueError(f"{json_path}: no models")
    for m in models:
        for k in ("name", "images_per_s", "quality"):
            if k not in m:
                raise ValueError(f"{json_path}: model entry lacks {k!r}: {m}")
        if not m["images_per_s"] > 0:
            raise ValueError(f"{json_path}: images_per_s must be > 0 for {m['name']!r}")
    lower = data.get("lower_is_better", True)
    metric = data.get("quality_metric", "quality")
    families = list(dict.fromkeys(m.get("family", m["name"]) for m in models))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m in models:
        c = colours[families.index(m.get("family", m["name"])) % len(colours)]
        ci = m.get("quality_ci95")
        yerr = None
        if isinstance(ci, (list, tuple)) and len(ci) == 2:
            yerr = [[m["quality"] - ci[0]], [ci[1] - m["quality"]]]
        ax.errorbar(m["images_per_s"], m["quality"], yerr=yerr, fmt="o", color=c, ms=7, capsize=3)
        label = m["name"] + (f" ({m['params'] / 1e6:.1f}M)" if m.get("params") else "")
        ax.annotate(label, (m["images_per_s"], m["quality"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("sampling speed (images/s, log scale)" +
                  (f", batch {data['batch_size']}" if data.get("batch_size") else ""))
    ax.set_ylabel(f"{metric} ({'lower' if lower else 'higher'} is better)")
    ax.annotate("better", xy=(0.95, 0.06 if lower else 0.94), xytext=(0.72, 0.2 if lower else 0.8),
                xycoords="axes fraction", arrowprops=dict(arrowstyle="->", color="gray"), color="gray", fontsize=8)
    ax.grid(alpha=0.3, which="both")
    dev = f" — measured on {data['device']}" if data.get("device") else ""
    ax.set_title((data.get("title") or "quality vs sampling speed") + dev, fontsize=10)
    ax.margins(x=0.25, y=0.15)
    fig.tight_layout()
    _save(fig, out_png)
    return out_png
