"""Feature extraction and the on-disk feature store (content-addressed, atomic, resumable, torchrun-aware)."""

from __future__ import annotations

from .distributed import DistInfo, dist_info, init_distributed, shard_for_rank
from .extract import cached_store, extract_features, plan_store
from .store import FeatureStore, read_manifest, store_key

__all__ = [
    "DistInfo",
    "FeatureStore",
    "cached_store",
    "dist_info",
    "extract_features",
    "init_distributed",
    "plan_store",
    "read_manifest",
    "shard_for_rank",
    "store_key",
]
