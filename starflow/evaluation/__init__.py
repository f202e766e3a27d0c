"""Evaluation: FD-EffNetLite0 (and FID from a local Inception file), k-NN precision/recall, conditional
accuracy with the project's digit classifier, test-split likelihood with confidence intervals, and the
report behind ``starflow eval``. Submodules are imported on first use so ``import starflow.evaluation``
stays cheap."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "EffNetLite0Features": "features", "InceptionFeatures": "features", "get_extractor": "features",
    "prepare_images": "features",
    "FeatureStats": "frechet", "frechet_distance": "frechet", "fd_from_features": "frechet",
    "reference_stats": "frechet", "FDSampleSizeWarning": "frechet",
    "train_classifier": "classifier", "load_mnist_classifier": "classifier", "conditional_accuracy": "classifier",
    "evaluate_nll": "likelihood", "mean_with_ci": "likelihood",
    "evaluate_model": "report", "format_table": "report", "write_json": "report", "validate_report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"starflow.evaluation.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'starflow.evaluation' has no attribute {name!r}")
