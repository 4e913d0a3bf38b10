"""The process context: one plain process, or one of many under torchrun.

``setup`` reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE), picks the
device, and starts the process group (NCCL on CUDA, gloo otherwise). Everything
rank-specific the engine needs goes through the frozen ``ProcessContext`` it
returns: reductions, barriers, and whether this is the main (global rank 0) process.
A single-device run is simply the world-size-1 case.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from encoderfit.utils import UserError, detect_device, launched_by_torchrun  # noqa: F401 (re-exported)

# A failure on one rank is caught by torchrun, which stops the others; this bounds
# the wait anyway if a peer disappears while the others sit in a collective.
T = TypeVar("T")
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("TRAIN_COLLECTIVE_TIMEOUT_MIN", "10")))


@dataclass(frozen=True)
class ProcessContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    torchrun: bool = False  # launched by torchrun: a process group and DDP, at world size 1 too

    @property
    def is_main(self) -> bool:
        """Global rank 0 (never LOCAL_RANK: every node has a local rank 0)."""
        return self.rank == 0

    @property
    def backend(self):
        """The process group's backend: "nccl" on CUDA, "gloo" on CPU, None outside torchrun."""
        return None if not self.distributed else "nccl" if self.device.type == "cuda" else "gloo"

    @property
    def distributed(self) -> bool:
        """Under torchrun, whatever the world size: one process runs the real NCCL/gloo code paths."""
        return self.torchrun or self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes, in place (a no-op on one process)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def broadcast_object(self, obj):
        """Rank 0's value of ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def run_on_main(self, fn: Callable[[], T], *, scope: str = "global") -> T:
        """``fn()`` on the main process, then its value, or its UserError, on every rank.

        ``scope="global"``: global rank 0 runs it (one answer for the job: the run directory, the
        checkpoint to resume). ``scope="node"``: each node's local rank 0 runs it and its node's
        ranks get its answer (work on node-local disks: the data cache). If any runner fails, every
        rank raises the first failure, so no rank goes on alone.
        """
        runs_it = self.is_main if scope == "global" else self.local_rank == 0
        answer = None
        if runs_it:
            try:
                answer = ("value", fn())
            except UserError as exc:
                answer = ("error", str(exc))
        if scope == "global":
            answer = self.broadcast_object(answer)
        elif self.distributed:
            node = (os.environ.get("GROUP_RANK"), socket.gethostname())  # torchrun's node number, and the host
            answers = self.all_gather_object((node, answer))
            failed = [a for _, a in answers if a is not None and a[0] == "error"]
            mine = [a for n, a in answers if n == node and a is not None]
            answer = failed[0] if failed else mine[0]
        if answer[0] == "error":
            raise UserError(answer[1])
        return answer[1]

    def max_int(self, value: int) -> int:
        """The largest ``value`` over all ranks."""
        if not self.distributed:
            return value
        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def all_agree(self, ok: bool) -> bool:
        """True only if ``ok`` holds on every rank (so all ranks take the same branch)."""
        if not self.distributed:
            return ok
        flag = torch.tensor([0 if ok else 1], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        return int(flag.item()) == 0


_GROUPS = 0  # process groups this process has made


@contextlib.contextmanager
def process_context(device_preference: str, use_torchrun_env: bool) -> Iterator[ProcessContext]:
    """Set up this process (and the process group under torchrun); always tear it down."""
    if not use_torchrun_env:
        yield ProcessContext(rank=0, local_rank=0, world_size=1, device=detect_device(device_preference))
        return

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    device = detect_device(device_preference)
    if device.type == "cuda":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
        if max(local_world, local_rank + 1) > torch.cuda.device_count():
            # every rank says it (rank_local): each one finds it out by itself, before any collective
            raise UserError(f"{local_world} processes on this node but {torch.cuda.device_count()} CUDA GPU(s): "
                            f"one process per GPU, so use --nproc_per_node {torch.cuda.device_count()} "
                            f"(or --device cpu for CPU processes)", rank_local=True)
        # One GPU per process, chosen before the process group starts so NCCL binds to it.
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "mps":
        raise UserError("DDP on Apple MPS is not supported: use --device cpu (gloo) or one process")
    else:
        backend = "gloo"
    # Keys of each torchrun restart under their own prefix: after --max-restarts brings the group back,
    # gloo would otherwise find the previous attempt's (dead) peer addresses in the store.
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT))
    # And each process group of this process (fit() called again in one torchrun job) under its own: every rank
    # counts its groups alike, so the ranks of one group meet under one prefix.
    global _GROUPS
    _GROUPS += 1
    store = dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/group-{_GROUPS}/", store)
    init_kwargs = {"backend": backend, "timeout": COLLECTIVE_TIMEOUT, "store": store, "rank": rank,
                   "world_size": world_size}
    if backend == "nccl":
        init_kwargs["device_id"] = device  # eager NCCL init, bound to this GPU
        # CUDA graphs record the gradient all-reduce, while another rank may run the same all-reduce eagerly
        # (its first batch of a shape): NCCL must not register a captured call's buffers, which it requires
        # of every rank or none
        os.environ.setdefault("NCCL_GRAPH_REGISTER", "0")
    dist.init_process_group(**init_kwargs)
    try:
        yield ProcessContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device, torchrun=True)
    finally:
        # On every exit path, errors included, so no rank leaves the group dangling.
        dist.destroy_process_group()


class StopSignal:
    """SIGTERM and SIGINT (preemption, Ctrl-C) ask the loop to stop at the next step boundary.

    Once training runs (``arm``), the handler sets a flag and says so at once: the step in flight
    finishes, a checkpoint is written, and the run exits saying how to resume. A second Ctrl-C
    interrupts at once. Before that (reading and tokenizing the data, loading the model) there is
    nothing to save, so a signal stops the run there and then. Under DDP the ranks agree (one
    small all-reduce) every ``every`` steps, so they all stop after the same step.
    """

    def __init__(self, log=None):
        self.signum = None
        self.armed = False
        self._log = log  # says what is happening on the main process (its print is silent elsewhere)
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        self._pid = os.getpid()  # forked DataLoader workers inherit the handler: they leave the stopping to us
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def arm(self) -> None:
        """From here on a signal stops the run after the current step, with a checkpoint."""
        self.armed = True

    def _say(self, text: str) -> None:
        if self._log is None or self._log.enabled:
            os.write(2, (text + "\n").encode())  # not print(): a signal may arrive inside a print

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return
        name = signal.Signals(signum).name
        if not self.armed:
            self._say(f"{name}: stopping now (nothing has been trained yet)")
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
            self._say(f"{name}: stopping after the current step and saving a checkpoint{again}...")
        self.signum = signum

    def requested(self, ctx: ProcessContext, step: int, every: int) -> bool:
        if not ctx.distributed:
            return self.signum is not None
        if step % every:
            return False
        agreed = ctx.max_int(self.signum or 0)  # the signal any rank got, so every rank stops here
        if agreed:
            self.signum = agreed
        return bool(agreed)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal"
