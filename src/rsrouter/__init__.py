"""rsrouter: certified robustness by routing among expert randomized-smoothing models."""

__version__ = "0.1.0"
