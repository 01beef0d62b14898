"""Heterogeneous parallel placement for multimodal LLM training.

The ViT runs pure data parallelism over its ranks; the LLM runs megatron-core's
tensor/pipeline/context/data parallelism; visual embeddings move between the two layouts.
"""

from hetero_parallel.groups import ParallelGroups, default_backend, initialize, teardown
from hetero_parallel.plan import DataRole, ParallelPlan, RankCoords

__all__ = [
    "DataRole",
    "ParallelGroups",
    "ParallelPlan",
    "RankCoords",
    "default_backend",
    "initialize",
    "teardown",
]
