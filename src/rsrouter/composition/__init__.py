"""The composition engine: dual certification, certify runs, baselines, reports, Hub bundles."""

from rsrouter.composition.dual import DualCertificate, DualPrediction, DualSmoothed, split_alpha

__all__ = ["DualCertificate", "DualPrediction", "DualSmoothed", "split_alpha"]
