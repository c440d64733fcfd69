"""Which process of a ``torchrun`` job this is, and what only rank 0 does.

Shared by the engines (:mod:`metacontrast.engines.distributed`), tracking and the workflows; it imports
nothing of the package.  Rank 0 (the *leader*) logs to MLflow, shows progress and writes files; the other
ranks get a :class:`FollowerRun` in place of the MLflow run, and drop the handlers that only show, log or
write.  A handler says which kind it is with a class attribute that :func:`metacontrast.engines.distributed.for_rank`
reads (so the engines need not import the handlers' modules):

* ``leader_only = True``: it only shows, logs or writes (dropped on ranks other than 0);
* ``resumes_on_every_rank = True``: a training checkpointer (``attach`` and ``resume``) that resumes on
  every rank, rank 0 first, and saves on rank 0 only.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch.distributed as dist

__all__ = ["FollowerRun", "is_leader", "rank", "world_size"]


def world_size() -> int:
    """The number of processes of the job (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank: from the process group, else ``RANK`` as ``torchrun`` sets it, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def is_leader() -> bool:
    """Rank 0: the process that logs and writes."""
    return rank() == 0


class FollowerRun:
    """Stands in for the MLflow run on ranks other than 0: accepts every logging call and does nothing."""

    run_id = None
    tracking_uri = ""
    is_fallback = False

    def __getattr__(self, name: str) -> Callable[..., bool]:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: False
