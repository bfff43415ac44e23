"""Radius tables, router training and the dual-smoothing composition engine."""

from rsrouter.router.dual import DualCertificate, DualPrediction, DualSmoothed, split_alpha

__all__ = ["DualCertificate", "DualPrediction", "DualSmoothed", "split_alpha"]
