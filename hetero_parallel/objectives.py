"""Training objectives, computed on the last pipeline stage from per-sample sums.

For every micro-batch the step reduces megatron's per-token loss (``-log p(label)``) over each
sample's loss-carrying tokens (the answer in SFT and preference data): `SampleSums` holds, per
sample, this CP rank's part of ``log p(answer)`` (differentiable) and of its token count. An
objective turns them into the micro-batch's loss sum and its normaliser:

- `TokenCrossEntropy` (pre-training, SFT): the mean token negative log-likelihood over the global
  batch; each CP rank contributes its own tokens.
- `MixedPreferenceObjective` (MPO, after trl's ``loss_type=["sigmoid", "bco_pair", "sft"]``):
  per preference pair (chosen ``c``, rejected ``r``, reference log-probs ``rc``, ``rr``),
  with ``lc = log pi(c) - rc`` and ``lr = log pi(r) - rr``::

      dpo = -log sigmoid(beta * (lc - lr))
      bco = -log sigmoid(beta * lc - delta) - log sigmoid(-(beta * lr - delta))
      sft = -log pi(c) / |c|                     (mean token NLL of the chosen answer)
      loss = w_dpo * dpo + w_bco * bco + w_sft * sft     (defaults 0.8, 0.2, 1.0)

  averaged over the global batch's pairs. ``delta`` is the running mean of the rewards
  ``beta * lc`` and ``beta * lr`` of the previous steps (BCO's reward shift; trl also folds in
  the current batch's rewards before computing the loss, which would make one micro-batch's loss
  depend on the others: here the current batch updates it after the step). A pair's two answers
  are in the same micro-batch (the balancer's group constraint), so each micro-batch's loss is
  complete on its last stage; under CP the per-sample sums are all-reduced over the CP group
  first, and each CP rank contributes a ``1 / cp`` share of the loss.

The normaliser (``count``) is what megatron divides the gradients by across the data-parallel
group (``calculate_per_token_loss``): loss tokens for token cross-entropy, pairs for MPO; the
caller's ``total_loss_tokens`` must be the global total of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SampleSums:
    """One micro-batch's per-sample sums on this CP rank (samples in micro-batch order)."""

    sample_ids: tuple[int, ...]
    logp: torch.Tensor
    """``[n]``: this rank's part of the sum of ``log p(label)`` over loss-carrying tokens."""
    tokens: torch.Tensor
    """``[n]``: this rank's part of the number of loss-carrying tokens (no gradient)."""


CpReduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over the CP group, differentiably (the identity without CP)."""


class Objective(Protocol):
    """The loss of one step's micro-batches (see the module docstring)."""

    def microbatch_loss(self, sums: SampleSums, cp_reduce: CpReduce, cp_size: int,
                        cp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss sum, normaliser) of one micro-batch on this CP rank; the loss sums and the
        normalisers of all micro-batches and CP ranks of the global batch add up to the global
        batch's."""
        ...


class StepData(Protocol):
    """What an objective reads of a step's data (the dataloader's ``StepData``)."""

    total_loss_tokens: int
    pairs: Mapping[int, int]
    """Preference pairs of the global batch: chosen sample id -> rejected sample id."""
    reference_logps: Mapping[int, float] | None
    """Sample id -> the reference model's summed log-prob of its answer (preference data)."""


class TrainingObjective(Protocol):
    """An objective across steps: binds to each step's data and keeps its state."""

    def for_step(self, data: StepData) -> tuple[Objective, int]:
        """This step's `Objective` and the global total of its normaliser."""
        ...

    def after_step(self, data: StepData, sample_logps: Mapping[int, float]) -> None:
        """Update the state from the step's per-sample log-probs (after a training step)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TokenCrossEntropy:
    """Mean token negative log-likelihood over the global batch (no state)."""

    def microbatch_loss(self, sums: SampleSums, cp_reduce: CpReduce, cp_size: int,
                        cp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return -sums.logp.sum(), sums.tokens.sum()

    def for_step(self, data: StepData) -> tuple[Objective, int]:
        return self, data.total_loss_tokens

    def after_step(self, data: StepData, sample_logps: Mapping[int, float]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass(frozen=True, kw_only=True, slots=True)
class MPOConfig:
    """Mixed preference optimisation (see the module docstring)."""

    beta: float = 0.1
    """Temperature of the implicit reward ``beta * (log pi - log ref)``."""
    preference_weight: float = 0.8
    """Weight of the DPO sigmoid term."""
    quality_weight: float = 0.2
    """Weight of the BCO pair term."""
    generation_weight: float = 1.0
    """Weight of the SFT term on the chosen answer."""

    def __post_init__(self) -> None:
        for name in ("beta", "preference_weight", "quality_weight", "generation_weight"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"MPOConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.beta == 0:
            raise ValueError("MPOConfig.beta must be > 0")


def mpo_pair_loss(config: MPOConfig, chosen_logp: torch.Tensor, rejected_logp: torch.Tensor,
                  chosen_ref: torch.Tensor, rejected_ref: torch.Tensor,
                  chosen_tokens: torch.Tensor, delta: float) -> torch.Tensor:
    """The MPO loss of each pair (elementwise over pairs)."""
    lc, lr = chosen_logp - chosen_ref, rejected_logp - rejected_ref
    b = config.beta
    dpo = -F.logsigmoid(b * (lc - lr))
    bco = -F.logsigmoid(b * lc - delta) - F.logsigmoid(-(b * lr - delta))
    sft = -chosen_logp / chosen_tokens
    return (config.preference_weight * dpo + config.quality_weight * bco
            + config.generation_weight * sft)


@dataclass(frozen=True)
class _BoundMPO:
    config: MPOConfig
    pairs: Mapping[int, int]
    """chosen sample id -> rejected sample id."""
    reference: Mapping[int, float]
    delta: float

    def microbatch_loss(self, sums: SampleSums, cp_reduce: CpReduce, cp_size: int,
                        cp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        logp = cp_reduce(sums.logp)
        tokens = cp_reduce(sums.tokens.detach())
        index = {s: i for i, s in enumerate(sums.sample_ids)}
        chosen = [s for s in sums.sample_ids if s in self.pairs]
        missing = [self.pairs[c] for c in chosen if self.pairs[c] not in index]
        if missing:
            raise ValueError(f"the rejected answers {missing[:4]} are not in the micro-batch of "
                             "their chosen ones: a preference pair was split (set group ids)")
        if not chosen:
            zero = logp.sum() * 0
            return zero, torch.zeros((), dtype=torch.int64, device=logp.device)
        ci = torch.tensor([index[c] for c in chosen], device=logp.device)
        ri = torch.tensor([index[self.pairs[c]] for c in chosen], device=logp.device)
        ref = torch.tensor([[self.reference[c], self.reference[self.pairs[c]]] for c in chosen],
                           dtype=logp.dtype, device=logp.device)
        losses = mpo_pair_loss(self.config, logp[ci], logp[ri], ref[:, 0], ref[:, 1], tokens[ci],
                               self.delta)
        count = len(chosen) if cp_rank == 0 else 0
        return losses.sum() / cp_size, torch.tensor(count, device=logp.device)


class MixedPreferenceObjective:
    """MPO (see the module docstring) with its one piece of state: the running mean of the
    rewards (``delta``), a checkpoint part (JSON)."""

    def __init__(self, config: MPOConfig | None = None) -> None:
        self.config = config or MPOConfig()
        self.reward_mean = 0.0
        self.reward_count = 0

    def for_step(self, data: StepData) -> tuple[Objective, int]:
        """This step's objective over ``data.pairs`` with ``data.reference_logps``."""
        pairs, reference = data.pairs, data.reference_logps
        if not pairs:
            raise ValueError("the MPO objective needs preference pairs: load preference records "
                             "(chosen and rejected answers) with LoaderConfig.preference=True")
        if reference is None:
            raise ValueError("the MPO objective needs the reference model's log-probs of every "
                             "answer (StepLoader(reference=...), dataloader.reference_logps)")
        missing = [s for c, r in pairs.items() for s in (c, r) if s not in reference]
        if missing:
            raise ValueError(f"no reference log-probs for samples {missing[:4]}")
        return _BoundMPO(self.config, dict(pairs), dict(reference), self.reward_mean), len(pairs)

    def after_step(self, data: StepData, sample_logps: Mapping[int, float]) -> None:
        """Fold this step's rewards (all pairs of the global batch) into the running mean."""
        reference = data.reference_logps or {}
        rewards = [self.config.beta * (sample_logps[s] - reference[s])
                   for c, r in sorted(data.pairs.items()) for s in (c, r)]
        if not rewards:
            return
        total = self.reward_count + len(rewards)
        self.reward_mean += (sum(rewards) - len(rewards) * self.reward_mean) / total
        self.reward_count = total

    def state_dict(self) -> dict[str, Any]:
        return {"reward_mean": self.reward_mean, "reward_count": self.reward_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "reward_mean" not in state or "reward_count" not in state:
            raise ValueError(f"the checkpoint holds no MPO state (it has {sorted(state)}): it was "
                             "saved by another objective; start MPO from its model instead")
        mean, count = state["reward_mean"], state["reward_count"]
        if not isinstance(mean, int | float) or not math.isfinite(mean):
            raise ValueError(f"MPO state reward_mean must be a finite number, got {mean!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"MPO state reward_count must be an int >= 0, got {count!r}")
        self.reward_mean, self.reward_count = float(mean), count
