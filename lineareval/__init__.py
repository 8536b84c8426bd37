"""lineareval: KV-cache eviction policies for raster-order autoregressive image generators.

Reference implementation of LineAR (arXiv 2512.04857) and its baselines on one cache engine.
"""

__version__ = "0.1.0"
