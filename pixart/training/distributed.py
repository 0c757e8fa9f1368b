"""Data parallel set-up under `msrun`: one process per device, ranks and world size from MindSpore's communication
layer (msrun's environment), gradients all-reduced as a mean over ranks inside the train step.

Nothing here assumes one machine: `msrun --worker_num=N --local_worker_num=n --node_rank=k --master_addr=...`
on several nodes gives the same init(); each rank reads its slice of every global batch, or its own webdataset
shards (pixart.data.dataset).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from mindspore.communication import get_group_size, get_rank
from mindspore.communication import init as comm_init

_MSRUN_ENV = ("MS_ROLE", "MS_WORKER_NUM", "MS_SCHED_HOST", "MS_SCHED_PORT")


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def min_over_ranks(self, value: int) -> int:
        """The smallest `value` of all ranks (every rank calls it). MindSpore's CPU AllReduce only sums, so each
        rank sums its value into its own slot of a vector."""
        if not self.distributed:
            return value
        slots = np.zeros(self.world_size, np.float32)  # exact for counts below 2**24
        slots[self.rank] = value
        return int(ops.AllReduce()(Tensor(slots)).asnumpy().min())


def launched_by_msrun() -> bool:
    return all(k in os.environ for k in _MSRUN_ENV)


def init(use_parallel: bool) -> Context:
    """Initialise collectives when `use_parallel` (call after the device is set); a single-process Context otherwise."""
    if not use_parallel:
        return Context()
    if not launched_by_msrun():
        raise ValueError("--use_parallel True needs the msrun launcher (e.g. msrun --worker_num=2 "
                         "--local_worker_num=2 train.py ... --use_parallel True); MS_ROLE / MS_WORKER_NUM are not set")
    comm_init()
    rank, world = get_rank(), get_group_size()
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=world)
    return Context(rank=rank, world_size=world)
