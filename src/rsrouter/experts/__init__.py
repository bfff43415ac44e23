"""Expert base classifiers, each bound to the sigma it was trained for."""

from rsrouter.experts.expert import Expert, ExpertConfig, load_denoiser
from rsrouter.experts.nets import build_classifier, count_parameters

__all__ = ["Expert", "ExpertConfig", "build_classifier", "count_parameters", "load_denoiser"]
