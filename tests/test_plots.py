"""starflow.evaluation.plots and ``starflow plot``: figures from a synthetic run directory and benchmark JSON files."""
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from starflow.evaluation import plots
from starflow.cli import main


def _write_run(root, space="pixel", noise_std=0.1, grids=14, fd=True, broken_tail=True):
    os.makedirs(os.path.join(root, "samples"))
    os.makedirs(os.path.join(root, "checkpoints", "step_0000200"))
    lines = [{"step": s, "loss": 1.0 - s / 1000, "grad_norm": 3.0, "lr": 1e-3, "images_per_s": 50.0}
             for s in range(50, 501, 50)]
    lines.insert(3, {"step": 150, "event": "rollback", "checkpoint": "x", "lr_scale": 0.5})
    if fd:
        lines.append({"step": 500, "fd": {"value": 12.5}})
    with open(os.path.join(root, "log.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in lines) + "\n")
        if broken_tail:
            f.write('{"step": 550, "loss": 0.4')  # a run still writing
    cfg = {"autoencoder": "mnist" if space == "latent" else None, "noise_std": noise_std}
    with open(os.path.join(root, "checkpoints", "step_0000200", "manifest.json"), "w") as f:
        json.dump({"step": 200, "train_config": cfg}, f)
    for i in range(grids):
        arr = np.full((10, 10), 20 * i % 256, np.uint8)
        Image.fromarray(arr, "L").save(os.path.join(root, "samples", f"step_{(i + 1) * 100:07d}.png"))
    if fd:
        os.makedirs(os.path.join(root, "eval"))
        rep = {"schema": "starflow.eval/1", "checkpoint": f"{root}/checkpoints/step_0000200",
               "metrics": {"fd": {"status": "ok", "name": "FD-EffNetLite0", "value": 30.0,
                                  "real_baseline": {"value": 2.0, "n_real": 100, "split": "train"}}}}
        with open(os.path.join(root, "eval", "a.json"), "w") as f:
            json.dump(rep, f)


def _is_png(path):
    with Image.open(path) as im:
        return im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_read_log_splits_records_events_and_skips_partial_line(tmp_path):
    _write_run(str(tmp_path / "run"))
    records, events, bad = plots.read_log(str(tmp_path / "run" / "log.jsonl"))
    assert [e["event"] for e in events] == ["rollback"]
    assert bad == 1
    assert [r["step"] for r in records if "loss" in r] == list(range(50, 501, 50))


def test_plot_run_pixel(tmp_path):
    run = str(tmp_path / "run")
    _write_run(run)
    paths, notes = plots.plot_run(run, str(tmp_path / "out"))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["fd.png", "samples_over_training.png", "training_curves.png"]
    assert all(_is_png(p) for p in paths)
    assert any("loss/ln2 + 7" in n and "σ=0.1" in n for n in notes), notes
    assert any("12 of 14" in n for n in notes), notes
    pts, baseline, name = plots.fd_points(run, plots.read_log(os.path.join(run, "log.jsonl"))[0])
    assert pts == [(200, 30.0), (500, 12.5)] and baseline == 2.0 and name == "FD-EffNetLite0"


def test_pixel_vs_latent_changes_the_figure(tmp_path):
    """A latent run gets no bits/dim panel; a pixel run gets one (the figure is taller)."""
    for space in ("pixel", "latent"):
        _write_run(str(tmp_path / space), space=space, fd=False)
    _, notes_p = plots.plot_run(str(tmp_path / "pixel"), str(tmp_path / "op"))
    _, notes_l = plots.plot_run(str(tmp_path / "latent"), str(tmp_path / "ol"))
    assert plots.run_info(str(tmp_path / "latent"))["space"] == "latent"
    assert any("latent-space run" in n for n in notes_l)
    assert not any("latent-space run" in n for n in notes_p)
    hp = Image.open(tmp_path / "op" / "training_curves.png").size[1]
    hl = Image.open(tmp_path / "ol" / "training_curves.png").size[1]
    assert hp > hl
    assert any("no FD points" in n for n in notes_p)


def test_bpd_series_is_loss_over_ln2_plus_7(tmp_path):
    """DESIGN.md §2: bpd = nats/dim / ln 2 + 7; 0 nats/dim of [-1, 1] data is 7 bits/dim of 8-bit data."""
    records = [{"step": 10, "loss": 0.0}, {"step": 20, "loss": math.log(2)}, {"step": 30, "loss": -0.5}]
    c = plots.curves(records, {"space": "pixel"})
    assert list(c["bpd"][0]) == [10, 20, 30]
    np.testing.assert_allclose(c["bpd"][1], [7.0, 8.0, 7.0 - 0.5 / math.log(2)])
    assert "bpd" not in plots.curves(records, {"space": "latent"})
    assert "bpd" not in plots.curves(records, {"space": "unknown"})


def test_plot_cli(tmp_path, capsys):
    run = str(tmp_path / "run")
    _write_run(run, fd=False, grids=2)
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({
        "schema": "starflow.guidance_sweep/1", "model": "tiny",
        "metrics": {"fd": {"label": "FD", "lower_is_better": True}},
        "rows": [{"rule": r, "guidance": w, "fd": 10 - w + (r == "tarflow") * w * w,
                  "accuracy": 0.5 + 0.05 * w, "fd_ci95": [9 - w, 11 - w]}
                 for r in ("starflow", "tarflow") for w in (0.0, 1.0, 2.0)]}))
    comp = tmp_path / "comp.json"
    comp.write_text(json.dumps({
        "schema": "starflow.model_comparison/1", "quality_metric": "FD-EffNetLite0", "device": "CPU",
        "models": [{"name": "STARFlow", "images_per_s": 40.0, "quality": 12.0, "params": 2_500_000, "family": "flow"},
                   {"name": "rectified flow", "images_per_s": 8.0, "quality": 15.0, "quality_ci95": [14, 16]}]}))
    out = tmp_path / "figs"
    assert main(["plot", run, "--out", str(out), "--guidance-sweep", str(sweep),
                 "--model-comparison", str(comp)]) == 0
    printed = capsys.readouterr().out
    for name in ("training_curves.png", "samples_over_training.png", "guidance_sweep.png", "model_comparison.png"):
        assert _is_png(out / name), name
        assert name in printed
    assert not (out / "fd.png").exists()


def test_plot_bad_input(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "log.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "starflow.eval/1", "rows": []}))
    with pytest.raises(ValueError, match="schema"):
        plots.plot_guidance_sweep(str(bad), str(tmp_path / "x.png"))
    bad.write_text(json.dumps({"schema": "starflow.model_comparison/1",
                               "models": [{"name": "a", "images_per_s": 0, "quality": 1}]}))
    with pytest.raises(ValueError, match="images_per_s"):
        plots.plot_model_comparison(str(bad), str(tmp_path / "x.png"))
    bad.write_text(json.dumps({"schema": "starflow.guidance_sweep/1", "rows": [{"rule": "starflow", "guidance": 1}]}))
    with pytest.raises(ValueError, match="no numeric metric"):
        plots.plot_guidance_sweep(str(bad), str(tmp_path / "x.png"))
