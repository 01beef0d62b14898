"""Process groups for a `ParallelPlan`: megatron-core's LLM state plus the ViT and routing groups.

``initialize(plan)`` is the only place in the library that creates process groups. It builds
megatron-core's parallel state with the plan's sizes and order (so megatron modules, schedules and
DDP work unchanged), then the ViT data-parallel group and the routing group (ViT ranks plus LLM
first-stage ranks, over which visual embeddings move). ``teardown(groups)`` undoes it.

Every rank must call both, in the same order, as with any collective group creation.
"""

from __future__ import annotations

import datetime
import gc
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hetero_parallel.plan import ParallelPlan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelGroups:
    """The groups this rank belongs to. ``vit`` is None on a rank that hosts no ViT replica."""

    plan: ParallelPlan
    rank: int
    backend: str
    vit: dist.ProcessGroup | None
    """ViT data-parallel group (gradient reduction of the ViT replicas)."""
    routing: dist.ProcessGroup | None
    """ViT ranks + LLM first-stage ranks: the all-to-all that moves visual embeddings. None on a
    rank that takes no part in routing."""
    token_broadcast: dist.ProcessGroup
    """megatron's tensor-and-context group: the token loader broadcasts token ids over it."""
    created: tuple[dist.ProcessGroup, ...] = ()
    """Every process group `initialize` created (megatron's included), for `teardown`."""

    @property
    def coords(self):
        return self.plan.coords(self.rank)


def _all_groups() -> list[dist.ProcessGroup]:
    """Every process group of this process except the default one."""
    world = dist.distributed_c10d._world
    default = dist.GroupMember.WORLD
    return [g for g in world.pg_map if g is not default]


def default_backend() -> str:
    """NCCL when CUDA is available, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def initialize(
    plan: ParallelPlan,
    *,
    backend: str | None = None,
    seed: int | None = 1234,
    timeout_minutes: int = 30,
) -> ParallelGroups:
    """Build megatron-core's parallel state and the ViT/routing groups for ``plan``.

    If ``torch.distributed`` is not initialised yet it is, from the usual torchrun environment
    variables. Raises ``ValueError`` before creating any group if the running world size differs
    from ``plan.world_size``. With ``seed`` set, megatron's model-parallel RNG tracker is seeded
    (on CPU this needs ``hetero_parallel.cpu_compat.cpu_compat()`` to be active).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    backend = backend or default_backend()
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != plan.world_size:
        raise ValueError(
            f"the running world size is {world} but the plan is for world_size="
            f"{plan.world_size} ({plan.describe()})"
        )
    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron-core parallel state already exists; call teardown() first")
    existing = set(_all_groups())

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=plan.tp,
        pipeline_model_parallel_size=plan.pp,
        virtual_pipeline_model_parallel_size=plan.vpp,
        context_parallel_size=plan.cp,
        order=plan.order,
        distributed_timeout_minutes=timeout_minutes,
    )
    timeout = datetime.timedelta(minutes=timeout_minutes)
    vit_group = dist.new_group(list(plan.vit_ranks), timeout=timeout)
    routing_ranks = plan.routing_ranks()
    routing_group = dist.new_group(list(routing_ranks), timeout=timeout)
    groups = ParallelGroups(
        plan=plan,
        rank=rank,
        backend=backend,
        vit=vit_group if plan.vit_index(rank) is not None else None,
        routing=routing_group if rank in routing_ranks else None,
        token_broadcast=parallel_state.get_tensor_and_context_parallel_group(),
        created=tuple(g for g in _all_groups() if g not in existing),
    )
    if seed is not None:
        model_parallel_cuda_manual_seed(seed)
    if rank == 0:
        logger.info("initialized %s on %s", plan.describe(), backend)
    return groups


def teardown(groups: ParallelGroups | None = None, *, destroy_world: bool = False) -> None:
    """Destroy megatron-core's parallel state and the groups built by `initialize`.

    With ``destroy_world`` the default process group goes too (the end of a job).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mcore_random

    parallel_state.destroy_model_parallel()
    mcore_random.get_cuda_rng_tracker().reset()
    if groups is not None:
        # megatron forgets its groups without destroying them; each gloo group keeps threads,
        # so a process that initialises many layouts (tests, benchmarks) would pile them up.
        live = set(_all_groups())
        for group in groups.created:
            if group in live:
                dist.destroy_process_group(group)
        # A destroyed gloo group's threads end when the group object is freed, and megatron's
        # modules hold it in reference cycles.
        gc.collect()
    if destroy_world and dist.is_initialized():
        dist.destroy_process_group()
