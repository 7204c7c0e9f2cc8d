"""Data-parallel training on PyTorch's own launcher: `torchrun --nproc_per_node N -m speedtune train ...`,
`accelerate launch -m speedtune train ...`, or `speedtune train --gpus N`, which re-launches itself under torchrun.

Every process (rank) loads the model on its own device (QLoRA included: each rank quantises its own copy) and trains
on its share of every optimizer step's rows: the recipe's rows per step are split across the ranks, so the update is
the one a single process makes with the same effective batch. transformers' Trainer (through accelerate) wraps the
model in DistributedDataParallel, which averages the gradients; the loss is normalised over the whole step's
trained tokens (summed across ranks). Rank 0 alone writes the run folder and shows progress. The process group is
NCCL on GPUs and gloo on CPUs (accelerate picks it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from speedtune.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place, from the variables torchrun and accelerate set (one process when there are none)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                 int(os.environ.get("WORLD_SIZE", 1)))


def init(w: World, device: str) -> None:
    """Join the process group before anything else talks to the other ranks (accelerate's PartialState: NCCL on
    GPUs, gloo on CPUs). Each rank uses the GPU of its local rank."""
    if w.size == 1:
        return
    if device == "cuda":
        import torch

        if torch.cuda.device_count() <= w.local_rank:
            raise UserError(f"rank {w.rank} wants GPU {w.local_rank} but only {torch.cuda.device_count()} are "
                            "visible; start at most that many processes per node")
        torch.cuda.set_device(w.local_rank)
    from accelerate import PartialState

    PartialState(cpu=device == "cpu")


def share(value, w: World):
    """Rank 0's `value` on every rank (e.g. the run folder's name, which has the time in it)."""
    if w.size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(w: World) -> None:
    if w.size > 1:
        import torch.distributed as dist

        dist.barrier()


def sum_across(values: list[int], w: World, device) -> list[int]:
    """Integers summed over the ranks (one small all-reduce)."""
    if w.size == 1:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(t)
    return [int(x) for x in t.tolist()]


def finish(w: World) -> None:
    if w.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def launch_command(processes: int, argv: list[str], module: str = "speedtune") -> list[str]:
    """The torchrun command that runs `python -m MODULE ARGV` as `processes` ranks on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m",
            module, *argv]


def relaunch(gpus: int, argv: list[str], console) -> int:
    """`speedtune train --gpus N`: check there are N GPUs, say what is launched, run it, return its exit code."""
    import torch

    have = torch.cuda.device_count()
    if gpus > have:
        raise UserError(f"--gpus {gpus}: this machine has {have} CUDA GPU{'s' if have != 1 else ''}; use at most "
                        f"{have}, or start processes yourself: torchrun --nproc_per_node N -m speedtune train ...")
    cmd = launch_command(gpus, argv)
    shown = " ".join(["torchrun", *cmd[3:]]) if shutil.which("torchrun") else " ".join(cmd)
    console.print(f"launching {gpus} processes: {shown}")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        return subprocess.run(cmd, env=env).returncode
    except KeyboardInterrupt:
        return 130


def strip_gpus(argv: list[str]) -> list[str]:
    """ARGV without its --gpus option (the re-launched processes are the N ranks themselves)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--gpus":
            skip = True
            continue
        if a.startswith("--gpus="):
            continue
        out.append(a)
    return out
