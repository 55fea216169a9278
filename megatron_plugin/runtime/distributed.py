"""Process-group start-up: torch.distributed + Megatron-Core parallel state, device, seeds."""

from __future__ import annotations

import datetime
import logging
import os
import random
import socket
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from megatron_plugin.config import ParallelConfig, data_parallel_size
from megatron_plugin.errors import UserError
from megatron_plugin.runtime import cpu_mode

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    data_parallel: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(parallel: ParallelConfig, seed: int = 1234, timeout_minutes: int = 30) -> Runtime:
    """Start torch.distributed (from torchrun's environment, or as one process) and Megatron-Core's
    parallel state. CPU mode is switched on when CUDA is absent (gloo backend)."""
    from megatron.core import parallel_state

    on_cuda = torch.cuda.is_available()
    if not on_cuda:
        cpu_mode.enable()
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    if not dist.is_initialized():
        # Under torchrun the env:// rendezvous; a plain `python -m ...` is a group of one on a free
        # local port (not written to os.environ, so processes it starts do not inherit it).
        init_method = "env://" if "MASTER_ADDR" in os.environ else f"tcp://127.0.0.1:{free_port()}"
        dist.init_process_group(
            backend="nccl" if on_cuda else "gloo",
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    data_parallel = data_parallel_size(parallel, world_size)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        context_parallel_size=parallel.context,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_everything(seed)
    return Runtime(rank=rank, world_size=world_size, device=device, data_parallel=data_parallel)


def decided_on_rank0(decide: Callable[..., T], *args) -> T:
    """`decide(*args)` on global rank 0, its answer (or the UserError it raised) handed to every
    rank: for decisions about shared files that all ranks must take alike, and so that no rank
    goes on alone when rank 0 stops."""
    answer, error = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            answer = decide(*args)
        except UserError as caught:
            error = caught
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [answer, error]
        dist.broadcast_object_list(box, src=0)
        answer, error = box
    if error is not None:
        error.same_on_every_rank = True  # the CLI prints it once
        raise error
    return answer


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; Megatron's tracker gives each TP rank its own model-parallel
    stream and each pipeline stage a distinct seed, as Megatron-LM does."""
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
