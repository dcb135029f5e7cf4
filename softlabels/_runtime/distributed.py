"""A small layer over ``torch.distributed`` for the teacher job, a no-op for one process: the group
``torchrun`` describes, and errors agreed on collectively (docs/ARCHITECTURE.md, Process plumbing).
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

from softlabels import errors

__all__ = ["Dist", "init"]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    # -- collectives (trivial with one process) --------------------------------------
    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0; ``None`` elsewhere."""
        if not self.active:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def agree(self, exc: BaseException | None) -> None:
        """Collective: raise on every rank if any rank failed (its own error where it has one)."""
        if not self.active:
            if exc is not None:
                raise exc
            return
        failures = self.all_gather(None if exc is None else pack_error(exc))
        if exc is not None:
            raise exc
        for packed in failures:
            if packed is not None:
                raise unpack_error(packed)


def init(device_type: str) -> Dist:
    """Join the process group torchrun describes in the environment (or run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dist = torch.distributed
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        atexit.register(_destroy)
    return Dist(dist.get_rank(), dist.get_world_size())


def _destroy() -> None:
    """At exit: wait (briefly) for every rank, then take the group down together; a rank tearing
    gloo down while a peer still uses it could abort the process (``terminate called ...``)."""
    if not torch.distributed.is_initialized():
        return
    try:
        if torch.distributed.get_backend() == "gloo":
            torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=30))
        else:
            torch.distributed.barrier()
    except Exception:  # a peer is gone (it failed, or was stopped): nothing to wait for
        pass
    torch.distributed.destroy_process_group()


def pack_error(exc: BaseException) -> tuple[str, str]:
    """A picklable description of an error (user exceptions may not pickle)."""
    return type(exc).__name__, str(exc)


def unpack_error(packed: tuple[str, str]) -> BaseException:
    """The error another rank raised: the same softlabels error class, else a RuntimeError."""
    name, message = packed
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.SoftLabelsError):
        return cls(message)
    return RuntimeError(f"another rank failed with {name}: {message}")
