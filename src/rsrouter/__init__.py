"""rsrouter: certified robustness by routing among expert randomized-smoothing models."""

__version__ = "0.1.0"
__all__ = ["__version__", "load_router"]


def __getattr__(name: str):
    """``rsrouter.load_router`` without importing torch at ``import rsrouter``."""
    if name == "load_router":
        from rsrouter.composition.bundle import load_router

        return load_router
    raise AttributeError(f"module 'rsrouter' has no attribute {name!r}")
