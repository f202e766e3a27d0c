"""Run a set of metrics on a generative model, print one table, write one JSON file.

Used by ``starflow eval`` and usable from Python (:func:`evaluate_model`) by every system in the
project (STARFlow, TARFlow, the peers): a model only needs ``sample(n, y=None, generator=None)`` returning
float images ``[n, C, H, W]`` in [-1, 1], a ``config`` (``num_classes`` > 0 marks a class-conditional
model), and, for likelihood, ``nll(x, y)`` (per-example nats/dim, x in [-1, 1]) and/or
``bits_per_dim(images_uint8, y)``. A model without them, or raising ``NotImplementedError``, gets "n/a".

Metrics (``--metrics``):

* ``fd``  — FD-EffNetLite0: Fréchet distance between N generated images and the reference split
  (default: the held-out ``test`` split), in EfficientNet-Lite0 features (see ``features.py``,
  ``frechet.py``). Not "FID": no Inception weights ship here.
* ``fid`` — standard FID, only with ``inception_weights`` (a local pt_inception file).
* ``pr``  — k-NN precision/recall (k=3) in the same EfficientNet-Lite0 features.
* ``acc`` — conditional accuracy of class-conditional samples (labels ``arange(N) % 10``, balanced)
  under the project's MNIST classifier; n/a for unconditional models or other datasets.
* ``nll`` — test-split NLL with a 95% Student-t confidence interval: ``nats_per_dim`` from
  ``model.nll`` on the model's space — test images in [-1, 1] for pixel models (not dequantised), their
  normalised latents ``model.autoencoder.encode(x)`` for latent models; for a model trained on noisy
  data (``model.noise_std`` > 0) seeded N(0, noise_std^2) noise is added first, as in training — and
  ``bits_per_dim`` from ``model.bits_per_dim`` (uniform dequantisation, pixel models).

``fd``, ``fid`` and ``pr`` also report a *real baseline*: the same metric for N real images from the
train split against the same reference — the score of a model that reproduces the training data
distribution exactly, at the same sample counts. FD is biased at small n, so read FD against this.

JSON schema (``schema: "starflow.eval/1"``)::

    {
      "schema": "starflow.eval/1",
      "checkpoint": str, "dataset": str, "reference_split": str,
      "num_samples": int, "seed": int, "device": str, "created": ISO-8601 str,
      "model": {"class": str, "num_classes": int, "conditional": bool},
      "sample_kwargs": {str: any},
      "feature_extractor": {"name": str, "metric": "FD-EffNetLite0", "dim": int, "image_size": int} | null,
      "timing_s": {"sampling": float, "<metric>": float, ...},
      "warnings": [str],
      "metrics": {
        "<metric>": {"status": "ok" | "n/a", "reason": str (only when "n/a"), ...},
        "fd":  {"name": "FD-EffNetLite0", "value": float, "n_gen": int, "n_ref": int, "feature_dim": int,
                "singular_covariance": bool, "estimator": str,
                "real_baseline": {"value": float, "n_real": int, "split": "train"} | null},
        "fid": {... same fields as fd, "name": "FID"},
        "pr":  {"precision": float, "recall": float, "k": int, "n_gen": int, "n_ref": int,
                "real_baseline": {"precision": float, "recall": float, "n_real": int, "split": "train"} | null},
        "acc": {"accuracy": float, "n": int, "per_class": [float], "labels": str,
                "classifier_test_accuracy": float | null},
        "nll": {"split": str, "conditioned_on_labels": bool, "space": "pixel" | "latent", "noise_std": float,
                "nats_per_dim": {"mean", "std", "sem", "ci95": [lo, hi], "confidence", "n", "unit"} | null,
                "bits_per_dim": {... same} | null,
                "reasons": {"nats_per_dim"?: str, "bits_per_dim"?: str}}
      }
    }

A metric that was not requested is absent from ``metrics``.
"""
from __future__ import annotations

import datetime
import json
import os
import time
import warnings

import torch

from starflow.data import build_dataset
from starflow.data.spaces import uint8_to_linear
from starflow.evaluation.classifier import ASSET_DIR, conditional_accuracy, load_mnist_classifier
from starflow.evaluation.features import InceptionFeatures, get_extractor
from starflow.evaluation.frechet import FDSampleSizeWarning, FeatureStats, compare_stats, reference_stats
from starflow.evaluation.likelihood import evaluate_nll
from starflow.evaluation.precision_recall import precision_recall
from starflow.evaluation.report_format import SCHEMA, format_table, validate_report, write_json

__all__ = ["SCHEMA", "ALL_METRICS", "parse_metrics", "evaluate_model", "format_table", "write_json",
           "validate_report"]

ALL_METRICS = ("fd", "fid", "pr", "acc", "nll")


def parse_metrics(spec: str | list[str]) -> list[str]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for m in (s.strip().lower() for s in items):
        if not m:
            continue
        if m not in ALL_METRICS:
            raise ValueError(f"unknown metric {m!r}; choose from {', '.join(ALL_METRICS)}")
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError("no metrics requested")
    return out


def _num_classes(model) -> int:
    cfg = getattr(model, "config", None)
    nc = cfg.get("num_classes", 0) if isinstance(cfg, dict) else getattr(cfg, "num_classes", 0)
    return int(nc or 0)


def _model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, (torch.device, str)):
        return torch.device(dev)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _generate(model, n, labels, batch_size, seed, sample_kwargs, device):
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        kw = dict(sample_kwargs)
        if labels is not None:
            kw["y"] = labels[i:i + b].to(device)
        x = model.sample(b, generator=g, **kw)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != b:
            raise ValueError(f"model.sample({b}) must return a tensor [{b}, C, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        out.append(x.detach().float().cpu())
    return torch.cat(out)


def _load_split(dataset: str, split: str):
    ds = build_dataset(dataset, split)
    if not hasattr(ds, "images"):
        raise ValueError(f"dataset {dataset!r} does not expose an image tensor")
    return ds.images, getattr(ds, "labels", None)


def _fd_metric(extractor, gen_images, dataset, ref_split, ref_images, train_images, n, seed, cache_dir,
               baseline, warn_list, batch_size):
    ref_stats, ref_feats = reference_stats(dataset, ref_split, extractor, cache_dir=cache_dir,
                                           images=ref_images, batch_size=batch_size)
    gen_feats = extractor.extract(gen_images, batch_size=batch_size).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FDSampleSizeWarning)
        gen_stats = FeatureStats.from_features(gen_feats)
    res = compare_stats(gen_stats, ref_stats)
    out = {"status": "ok", "name": extractor.metric_name, "value": res["value"], "n_gen": gen_stats.n,
           "n_ref": ref_stats.n, "feature_dim": res["feature_dim"],
           "singular_covariance": res["singular_covariance"], "estimator": res["estimator"], "real_baseline": None}
    if res["singular_covariance"]:
        warn_list.append(f"{extractor.metric_name}: n_gen={gen_stats.n}, n_ref={ref_stats.n} vs feature dim "
                         f"{res['feature_dim']}: covariance singular, FD biased upwards; compare at equal n "
                         "and against the real baseline")
    base_feats = None
    if baseline:
        if train_images is not None and n <= len(train_images) and ref_split != "train":
            base_stats, base_feats = reference_stats(dataset, "train", extractor, n=n, seed=seed,
                                                     cache_dir=cache_dir, images=train_images,
                                                     batch_size=batch_size)
            out["real_baseline"] = {"value": compare_stats(base_stats, ref_stats)["value"], "n_real": base_stats.n,
                                    "split": "train"}
        else:
            warn_list.append(f"{extractor.metric_name}: no real baseline (needs the train split, n <= its size, "
                             "and a reference split other than train)")
    return out, ref_feats, gen_feats, base_feats


def evaluate_model(model, metrics, dataset: str = "mnist", num_samples: int = 1000, ref_split: str = "test",
                   seed: int = 0, batch_size: int = 100, feature_batch_size: int = 100, image_size: int = 128,
                   cache_dir: str | None = None, inception_weights: str | None = None, baseline: bool = True,
                   sample_kwargs: dict | None = None, checkpoint: str = "", nll_max: int | None = None,
                   log=print) -> dict:
    """Run ``metrics`` on ``model``; return the report dict (schema in the module docstring)."""
    metrics = parse_metrics(metrics)
    sample_kwargs = dict(sample_kwargs or {})
    if num_samples < 2 and any(m in metrics for m in ("fd", "fid", "pr", "acc")):
        raise ValueError(f"--num-samples must be >= 2 (a covariance needs 2 samples; k-NN needs > k), got {num_samples}")
    if "pr" in metrics and num_samples <= 3:
        raise ValueError(f"precision/recall with k=3 needs --num-samples > 3, got {num_samples}")
    if "fid" in metrics and not inception_weights:
        raise ValueError("metric 'fid' needs --inception-weights PATH (a local pt_inception weights file); "
                         "use 'fd' for FD-EffNetLite0")
    log = log or (lambda *a, **k: None)
    device = _model_device(model)
    nc = _num_classes(model)
    warn_list: list[str] = []
    timing: dict[str, float] = {}
    report = {
        "schema": SCHEMA, "checkpoint": checkpoint, "dataset": dataset, "reference_split": ref_split,
        "num_samples": num_samples, "seed": seed, "device": str(device),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"class": type(model).__name__, "num_classes": nc, "conditional": nc > 0},
        "sample_kwargs": sample_kwargs, "feature_extractor": None, "timing_s": timing, "warnings": warn_list,
        "metrics": {},
    }
    ref_images, ref_labels = _load_split(dataset, ref_split)
    train_images = _load_split(dataset, "train")[0] if ref_split != "train" else ref_images

    gen = labels = None
    if any(m in metrics for m in ("fd", "fid", "pr", "acc")):
        labels = torch.arange(num_samples) % nc if nc > 0 else None
        t0 = time.time()
        log(f"sampling {num_samples} images ({'class-balanced labels' if nc else 'unconditional'}) ...")
        gen = _generate(model, num_samples, labels, batch_size, seed, sample_kwargs, device)
        timing["sampling"] = time.time() - t0
        want = tuple(ref_images.shape[1:])
        if tuple(gen.shape[1:]) != want:
            raise ValueError(f"generated images have shape {tuple(gen.shape[1:])} but {dataset}/{ref_split} images are "
                             f"{want}: channel count or image size mismatch")
        if not torch.isfinite(gen).all():
            raise ValueError(f"{int((~torch.isfinite(gen)).flatten(1).any(1).sum())} generated images contain NaN/inf")

    effnet_feats = None
    if "fd" in metrics or "pr" in metrics:
        ext = get_extractor("effnetlite0", image_size=image_size, device=device)
        report["feature_extractor"] = {"name": ext.name, "metric": ext.metric_name, "dim": ext.dim,
                                       "image_size": ext.input_size}
        t0 = time.time()
        log(f"{ext.metric_name} features ...")
        fd, ref_f, gen_f, base_f = _fd_metric(ext, gen, dataset, ref_split, ref_images, train_images, num_samples,
                                              seed, cache_dir, baseline, warn_list, feature_batch_size)
        effnet_feats = (ref_f, gen_f, base_f)
        if "fd" in metrics:
            report["metrics"]["fd"] = fd
        timing["fd"] = time.time() - t0

    if "fid" in metrics:
        t0 = time.time()
        log("FID (Inception) features ...")
        inc = InceptionFeatures(inception_weights, device=device)
        fid = _fd_metric(inc, gen, dataset, ref_split, ref_images, train_images, num_samples, seed, cache_dir,
                         baseline, warn_list, feature_batch_size)[0]
        report["metrics"]["fid"] = fid
        timing["fid"] = time.time() - t0

    if "pr" in metrics:
        t0 = time.time()
        ref_f, gen_f, base_f = effnet_feats
        pr = precision_recall(ref_f, gen_f, k=3)
        out = {"status": "ok", "precision": pr["precision"], "recall": pr["recall"], "k": pr["k"],
               "n_gen": pr["n_gen"], "n_ref": pr["n_real"], "real_baseline": None}
        if base_f is not None:
            b = precision_recall(ref_f, base_f, k=3)
            out["real_baseline"] = {"precision": b["precision"], "recall": b["recall"], "n_real": b["n_gen"],
                                    "split": "train"}
        report["metrics"]["pr"] = out
        timing["pr"] = time.time() - t0

    if "acc" in metrics:
        t0 = time.time()
        if nc == 0:
            report["metrics"]["acc"] = {"status": "n/a", "reason": "model is not class-conditional (num_classes=0)"}
        elif dataset != "mnist" or nc != 10:
            report["metrics"]["acc"] = {"status": "n/a",
                                        "reason": f"the committed classifier is for mnist with 10 classes "
                                                  f"(dataset={dataset}, num_classes={nc})"}
        else:
            clf = load_mnist_classifier(device=device)
            res = conditional_accuracy(gen, labels, classifier=clf)
            test_acc = None
            info = os.path.join(ASSET_DIR, "training.json")
            if os.path.exists(info):
                with open(info) as f:
                    test_acc = json.load(f).get("test_accuracy")
            report["metrics"]["acc"] = {"status": "ok", "accuracy": res["accuracy"], "n": res["n"],
                                        "per_class": res["per_class"], "labels": "balanced: arange(N) % num_classes",
                                        "classifier_test_accuracy": test_acc}
        timing["acc"] = time.time() - t0

    if "nll" in metrics:
        t0 = time.time()
        report["metrics"]["nll"] = _nll_metric(model, ref_images, ref_labels, nc, ref_split, batch_size, seed,
                                               nll_max, device, log)
        timing["nll"] = time.time() - t0
    return report


def _nll_metric(model, images, labels, nc, split, batch_size, seed, nll_max, device, log):
    if nll_max is not None and nll_max < len(images):
        # a seeded random subset: dataset splits may be sorted by class
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:nll_max].sort().values
        images = images[idx]
        labels = labels[idx] if labels is not None else None
    use_labels = labels if nc > 0 else None
    ae = getattr(model, "autoencoder", None)
    noise_std = float(getattr(model, "noise_std", 0.0) or 0.0)
    out = {"status": "n/a", "split": split, "conditioned_on_labels": use_labels is not None,
           "space": "latent" if ae is not None else "pixel", "noise_std": noise_std,
           "nats_per_dim": None, "bits_per_dim": None, "reasons": {}}

    def to_dev(y):
        return None if y is None else y.to(device)

    def nats(x, y):
        v = uint8_to_linear(x).to(device)
        if ae is not None:  # a latent model's density lives on (normalised) latents
            v = ae.encode(v)
        if noise_std > 0:  # the model was fit to data + N(0, noise_std^2): score what it models
            v = v + noise_std * torch.randn_like(v)
        return model.nll(v, to_dev(y))

    parts = {
        "nats_per_dim": ("nll", nats, "nats/dim"),
        "bits_per_dim": ("bits_per_dim", lambda x, y: model.bits_per_dim(x.to(device), to_dev(y)), "bits/dim"),
    }
    for key, (attr, fn, unit) in parts.items():
        if not callable(getattr(model, attr, None)):
            out["reasons"][key] = f"model has no {attr}()"
            continue
        log(f"{key} on {len(images)} {split} images ...")
        try:
            out[key] = evaluate_nll(fn, images, use_labels, batch_size=batch_size, unit=unit, seed=seed)
        except NotImplementedError as e:
            out["reasons"][key] = f"{attr}() not implemented: {e}".strip()
    if out["nats_per_dim"] is not None or out["bits_per_dim"] is not None:
        out["status"] = "ok"
    else:
        out["reason"] = "; ".join(out["reasons"].values())
    return out


