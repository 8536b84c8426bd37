"""lineareval: KV-cache eviction policies for raster-order autoregressive image generators.

Reference implementation of LineAR (arXiv 2512.04857) and its baselines on one cache engine.
"""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """`lineareval.api.load`: a model under a cache policy, ready to generate (imported on first use)."""
    from lineareval.api import load as load_pipeline

    return load_pipeline(*args, **kwargs)
