"""Turn benchmark results (benchmarks/results/*.json) into the README's figures (docs/images/).

    python benchmarks/figures.py
"""
from __future__ import annotations

import json
import os
import tempfile

from starflow.evaluation.plots import plot_guidance_sweep, plot_model_comparison

RESULTS = os.path.join(os.path.dirname(__file__), "results")
IMAGES = os.path.join(os.path.dirname(__file__), "..", "docs", "images")


def _write(data: dict) -> str:
    fd, path = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    return path


def guidance_figure() -> str | None:
    src = os.path.join(RESULTS, "guidance_sweep.json")
    if not os.path.exists(src):
        return None
    data = json.load(open(src))
    rows = [{"rule": r["rule"], "guidance": r["w"], "fd": r["fd"], "accuracy": r["accuracy"]} for r in data["rows"]]
    spec = {"schema": "starflow.guidance_sweep/1", "model": "shipped MNIST STARFlow", "rows": rows,
            "metrics": {"fd": {"label": f"FD-EffNetLite0 (n={data['n']}; real: {data['real_fd']:.1f})", "lower_is_better": True},
                        "accuracy": {"label": "classifier accuracy", "lower_is_better": False}}}
    return plot_guidance_sweep(_write(spec), os.path.join(IMAGES, "guidance_sweep.png"))


def comparison_figure() -> str | None:
    src = os.path.join(RESULTS, "compare_models_shapes_h200.json")
    if not os.path.exists(src):
        return None
    results = json.load(open(src))["results"]
    models = []
    for name, r in results.items():
        speeds = r["sampling_images_per_s"]
        # Quality was measured with rectified flow's default 50 Euler steps: plot only that point.
        sp, label = (speeds["50 steps"], " (50 steps)") if "50 steps" in speeds else (speeds, "")
        models.append({"name": name + label, "images_per_s": sp["64"], "quality": r["shapes_eval_overall"],
                       "params": r["params"], "family": "starflow" if name == "starflow" else name})
    spec = {"schema": "starflow.model_comparison/1", "title": "Shapes text-to-image, equal params and training",
            "quality_metric": "ShapesEval overall",
            "lower_is_better": False, "device": "H200", "batch_size": 64, "models": models}
    return plot_model_comparison(_write(spec), os.path.join(IMAGES, "model_comparison.png"))


def shapes_curve_figure() -> str | None:
    """ShapesEval of the shipped shapes flow after each training run, against the training images it had
    seen (CPU runs, then a GPU one: minutes are not comparable across machines), with the targets."""
    src = os.path.join(RESULTS, "shapes_curve.json")
    if not os.path.exists(src):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(src))
    pts = data["points"]
    seen = [p["images"] / 1e6 for p in pts]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for cat in pts[0]["categories"]:
        ax.plot(seen, [p["categories"][cat] for p in pts], marker=".", lw=1, alpha=0.7, label=cat)
    ax.plot(seen, [p["overall"] for p in pts], marker="o", lw=2.5, color="black", label="overall")
    if "balanced_arm_at_11800" in data:  # session 12's A/B: the same steps with the categories balanced
        arm = next(p for p in pts if p["steps"] == 11800)
        ax.plot([arm["images"] / 1e6], [data["balanced_arm_at_11800"]["overall"]], marker="x", ms=9,
                color="black", ls="none", label="overall, categories balanced")
    ax.axhline(data["targets"]["overall"], ls="--", color="black", lw=1)
    ax.axhline(data["targets"]["every_category"], ls=":", color="grey", lw=1)
    for p in pts:
        ax.annotate(f"{p['steps']} steps\n{p['machine'].split(',')[0]}", (p["images"] / 1e6, p["overall"]),
                    textcoords="offset points", xytext=(0, -22), ha="center", fontsize=6)
    ax.set_xscale("log")
    ax.set(xlabel="training images seen (millions)", ylabel="ShapesEval (300 test prompts, w 0.5, T 0.3)",
           ylim=(0, 1.02), title="Shipped shapes flow: targets 0.90 overall (dashed), 0.75 per category (dotted)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    out = os.path.join(IMAGES, "shapes_curve.png")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    for fn in (guidance_figure, comparison_figure, shapes_curve_figure):
        print(fn.__name__, "->", fn())
