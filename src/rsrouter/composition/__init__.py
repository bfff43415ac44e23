"""The composition engine: dual certification, the experts' cascade, certify runs, baselines,
reports, Hub bundles."""

from rsrouter.composition.cascade import CascadeSpec
from rsrouter.composition.dual import DualCertificate, DualPrediction, DualSmoothed, split_alpha

__all__ = ["CascadeSpec", "DualCertificate", "DualPrediction", "DualSmoothed", "split_alpha"]
