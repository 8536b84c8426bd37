"""The cache engine and its policies. Policies are selected by `conf/cache/*.yaml` (`_target_`)."""

from lineareval.cache.engine import KVCache
from lineareval.cache.policy import CachePolicy, EvictAt, EvictionContext, ScoreNeed, TokenLayout
from lineareval.cache.selection import PolicyContractError
from lineareval.cache.state import CacheState
from lineareval.cache.store import LayerKV

__all__ = ["CachePolicy", "CacheState", "EvictAt", "EvictionContext", "KVCache", "LayerKV", "PolicyContractError",
           "ScoreNeed", "TokenLayout"]
