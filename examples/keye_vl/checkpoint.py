"""Checkpoints of a Keye-VL run: per-rank shards for exact resumption, an unsharded export for the
next stage.

Layout under ``out``:
- ``ckpt/step_<n>/rank_<r>.pt``: this rank's LLM chunks and optimizer, its ViT replica and
  optimizer, the loader state (a few integers) and the RNG state; ``ckpt/latest`` names the last
  complete step (written by rank 0 after every rank has saved, so a crash mid-save leaves the
  previous checkpoint as the latest);
- ``final/model.pt``: ``{"vision": state_dict, "llm": unsharded state}`` with single-model names,
  loadable into any TP/PP layout (``load_full_state``) and mergeable (``merge.py``).

Resuming needs the same parallel layout as the run that saved (the shards are per rank); the
loader state itself is topology-free.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from examples.keye_vl.llm import gather_full_state


def _step_dir(out: Path, step: int) -> Path:
    return out / "ckpt" / f"step_{step:07d}"


def _layout(trainer) -> dict[str, int]:
    plan = trainer.groups.plan
    return {"world_size": plan.world_size, "tp": plan.tp, "pp": plan.pp, "cp": plan.cp,
            "vpp": plan.vpp or 0}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(out: Path, step: int, trainer, loader, rank: int) -> None:
    """Collective: every rank writes its shard, then rank 0 marks the step complete."""
    directory = _step_dir(out, step)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "layout": _layout(trainer),
        "llm": [m.state_dict() for m in trainer.llm],
        "llm_optimizer": (trainer.llm_optimizer.state_dict()
                          if trainer.llm_optimizer is not None else None),
        "vision": trainer.vision.state_dict() if trainer.vision is not None else None,
        "vision_optimizer": (trainer.vision_optimizer.state_dict()
                             if trainer.vision_optimizer is not None else None),
        "loader": loader.state_dict(),
        "rng": torch.get_rng_state(),
    }
    _atomic_save(state, directory / f"rank_{rank}.pt")
    dist.barrier()
    if rank == 0:
        tmp = out / "ckpt" / "latest.tmp"
        tmp.write_text(str(step))
        os.replace(tmp, out / "ckpt" / "latest")
    dist.barrier()


def latest_step(out: Path) -> int | None:
    path = out / "ckpt" / "latest"
    return int(path.read_text()) if path.exists() else None


def load_checkpoint(out: Path, step: int, trainer, loader, rank: int) -> None:
    path = _step_dir(out, step) / f"rank_{rank}.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["layout"] != _layout(trainer):
        raise ValueError(f"{path} was saved with layout {state['layout']} but this run has "
                         f"{_layout(trainer)}; resume with the same --tp/--pp/--cp and world size "
                         "(or start a new stage from final/model.pt with --init-from)")
    for module, saved in zip(trainer.llm, state["llm"], strict=True):
        module.load_state_dict(saved)
    if trainer.llm_optimizer is not None:
        trainer.llm_optimizer.load_state_dict(state["llm_optimizer"])
    if trainer.vision is not None:
        trainer.vision.load_state_dict(state["vision"])
    if trainer.vision_optimizer is not None:
        trainer.vision_optimizer.load_state_dict(state["vision_optimizer"])
    loader.load_state_dict(state["loader"])
    torch.set_rng_state(state["rng"])


def export_unsharded(directory: Path, trainer, rank: int) -> None:
    """Collective: write ``directory/model.pt`` with the whole model under single-model names."""
    plan = trainer.groups.plan
    directory.mkdir(parents=True, exist_ok=True)
    stage_state = gather_full_state(trainer.llm)  # gathers over TP
    c = plan.coords(rank)
    if c.tp == 0 and c.cp == 0 and c.dp == 0:
        _atomic_save(stage_state, directory / f"llm_stage{c.pp}.pt")
    if plan.vit_index(rank) == 0:
        _atomic_save(trainer.vision.state_dict(), directory / "vision.pt")
    dist.barrier()
    if rank == 0:
        llm = {}
        for pp in range(plan.pp):
            part = directory / f"llm_stage{pp}.pt"
            llm.update(torch.load(part, map_location="cpu", weights_only=True))
            part.unlink()
        vision = torch.load(directory / "vision.pt", map_location="cpu", weights_only=True)
        (directory / "vision.pt").unlink()
        _atomic_save({"vision": vision, "llm": llm}, directory / "model.pt")
    dist.barrier()


def load_unsharded(path: str | Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "model" in state:  # a merge.py output
        state = state["model"]
    missing = {"vision", "llm"} - set(state)
    if missing:
        raise ValueError(f"{path}: not an unsharded Keye-VL model (missing {sorted(missing)})")
    return state
