"""Data-parallel training: the process group a launcher describes, and the trainables' DDP.

`torchrun` and `accelerate launch` both start one process per GPU with RANK, WORLD_SIZE and
LOCAL_RANK (and the rendezvous address) in the environment; reading them here means
`train-compressor` runs data-parallel under either with no change. Only the <COMP> table and
the LoRA are trainable, so only they go into DistributedDataParallel (a holder module of
those parameters alone): DDP averages their gradients across processes in its backward hooks,
and the frozen base model, identical in every process, is never broadcast or synchronised.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

TIMEOUT = timedelta(hours=2)  # rank 0 evaluates while the others wait at a barrier


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that evaluates, logs and writes the files."""
        return self.rank == 0


def world(device: str = "auto") -> World:
    """The launcher's world, with its process group started (once): NCCL when training on
    CUDA, gloo on the CPU (`device` "cpu"); each process takes the GPU of its local rank."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    here = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and device != "cpu"
        if cuda:
            torch.cuda.set_device(here.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return here


class _Trainables(nn.Module):
    """The trainable tensors alone (the same Parameter objects the model uses); its forward
    runs the step's loss, so DDP sees the step begin and end."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)

    def forward(self, loss):
        return loss()


class Step:
    """Runs a step's loss and backward so that the gradients are averaged over the world:
    through DDP when there is more than one process, directly otherwise."""

    def __init__(self, params: list[nn.Parameter], here: World) -> None:
        self.here, self.params = here, params
        holder = _Trainables(params)
        self.ddp = None
        if here.size > 1:
            on_cuda = params[0].device.type == "cuda"
            # DDP broadcasts rank 0's trainables: every process starts from the same ones
            self.ddp = DistributedDataParallel(
                holder, device_ids=[params[0].device.index] if on_cuda else None)

    def backward(self, loss, last: bool):
        """Run `loss()` (a dict with "loss") and its backward; the gradients are averaged
        across processes on the `last` micro-batch of the step (summed locally before)."""
        if self.ddp is None:
            parts = loss()
            parts["loss"].backward()
            return parts
        context = contextlib.nullcontext() if last else self.ddp.no_sync()
        with context:
            parts = self.ddp(loss)
            parts["loss"].backward()
        return parts


def any_rank(flag: bool, here: World) -> bool:
    """True in every process when it is true in one (stopping must be agreed)."""
    if here.size == 1:
        return flag
    t = torch.tensor([float(flag)], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean(values: dict[str, float], here: World) -> dict[str, float]:
    """Each value's mean over the processes (for the log of a step)."""
    if here.size == 1 or not values:
        return values
    keys = sorted(values)  # the same order in every process
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return dict(zip(keys, (t / here.size).tolist(), strict=True))


def barrier(here: World) -> None:
    if here.size > 1:
        dist.barrier()


def _device() -> torch.device:
    backend = dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
        else torch.device("cpu")
