"""Running gloo process groups on CPU in the tests.

gloo's CPU workers now and then abort on a heavily loaded 2-core machine ("terminate called
without an active exception", the worker killed by SIGABRT), independently of the code
under test: seen once in a few dozen runs of the DDP and FSDP tests while other test
processes competed for the cores. Such a run is repeated once; a real failure fails again.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import torch.multiprocessing as mp

GLOO_ABORT = "terminate called without an active exception"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable, *args, nprocs: int) -> None:
    """``mp.spawn(fn, args=(port, *args), nprocs=nprocs)`` on a free port, repeated once
    (on a new port) when a worker died of SIGABRT."""
    for attempt in (0, 1):
        try:
            mp.spawn(fn, args=(free_port(), *args), nprocs=nprocs, join=True)
            return
        except mp.ProcessExitedException as exc:
            if attempt or exc.signal_name != "SIGABRT":
                raise
