"""The cache engine and its policies. Policies are selected by `conf/cache/*.yaml` (`_target_`)."""

from lineareval.cache.engine import CacheState, KVCache, LayerKV
from lineareval.cache.policy import CachePolicy, EvictAt, EvictionContext, ScoreNeed, TokenLayout

__all__ = ["CachePolicy", "CacheState", "EvictAt", "EvictionContext", "KVCache", "LayerKV", "ScoreNeed",
           "TokenLayout"]
