"""Expert base classifiers, each bound to the sigma it was trained for."""

from rsrouter.experts.nets import build_classifier, count_parameters

__all__ = ["build_classifier", "count_parameters"]
