"""Baselines that are not FlexMerge plans but reuse its storage path (materialize -> bundle).

* :mod:`.channel_merging`: Channel Merging (Zhang et al., AAAI 2025), per-tensor k-means over
  tasks with cosine distance, merged within clusters by task arithmetic; integer sizes only.
"""

from .channel_merging import ChannelMerging, integer_size, kmeans_cosine_gram

__all__ = ["ChannelMerging", "integer_size", "kmeans_cosine_gram"]
