"""Data-parallel training with torch.distributed (launched by torchrun: `batchrl train --nproc N`).

Every rank holds the same networks and optimisers and draws its own share of each batch (the algorithm's
``batch_size`` split evenly: the effective batch and the learning rates are the single-process ones). The
gradients are averaged across ranks before each optimiser step (``synchronise``): a hook on every parameter
an optimiser steps marks it when autograd accumulates its gradient, and a step pre-hook on the optimiser
all-reduces the marked gradients as one flat buffer and divides by the number of ranks. Code that reads
gradients between backward and step (the Decision Transformer's gradient-norm clip) calls
``reduce_gradients`` first, so it sees the averaged gradient, as in one process.

Why not DistributedDataParallel: DDP reduces the gradients of one wrapped module's forward and backward per
step. These updates run several losses through the same networks (IQL steps three optimisers per update;
CQL's, TD3+BC's and BCQ's actor losses run through a frozen critic; CQL's temperature and Lagrange
multiplier are bare parameters), so one DDP wrapper per network would reduce at the wrong times or not at
all. Reducing what each optimiser is about to apply is exact for all of them: averaging is linear, so a
gradient that two backward passes accumulate before a step is still the mean of the ranks' sums.

A loss that is not a mean over equally many samples per rank (the Decision Transformer's error over the
unpadded steps) divides by ``average`` of its count, the mean over ranks, which makes the averaged gradient
that of the whole batch's loss.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

RANK_SEED_STRIDE = 2 ** 32  # rank r's streams start from seed + r * stride: distinct for every seed < 2**32


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def seed(self, seed: int) -> int:
        """This rank's seed for its own random streams (rank 0's is ``seed``: a one-process run's)."""
        return seed + self.rank * RANK_SEED_STRIDE


SINGLE = World()


def launched() -> bool:
    """Whether this process is one of several that torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch(nproc: int, argv: list[str]) -> int:
    """Run `batchrl train argv` as ``nproc`` ranks of torchrun --standalone, this process its agent, and return
    the exit status. The ranks report what happened (a stop signal: where they stopped, in one line), so
    torchrun's own reports are not shown: the SignalException it raises when the agent gets Ctrl-C or SIGTERM
    (which it passes on to the ranks) is exit status 128 + the signal, as in one process; a failed rank's
    status is returned as is (its error is above, and torchrun's log line saying it failed is not shown).
    A failure of torchrun itself (e.g. its rendezvous) still raises."""
    # torchrun's own default per rank, set here so that it prints no banner saying it sets it
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in list(logging.root.manager.loggerDict):  # (each torchrun module sets its logger's level)
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "batchrl.cli", "train", *argv]))
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        code = exc.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code  # (negative: the rank died of that signal)
    return 0


def join(device: torch.device) -> World:
    """Join torchrun's process group (gloo on the CPU, NCCL on CUDA) when launched by it, else one process."""
    if not launched():
        return SINGLE
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # Rank 0 evaluates while the others wait at the next collective: allow a long evaluation.
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return World(dist.get_rank(), dist.get_world_size())


def leave(wait: bool = True) -> None:
    """Leave the process group; ``wait`` (the normal end) first waits for every rank at a barrier: a rank
    tearing gloo down while another still talks to it was seen to abort ("terminate called without an active
    exception"). After an error, leave without waiting (the other ranks may never arrive)."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def synchronise(algo, world: World) -> None:
    """Make ``algo``'s ranks one model: rank 0's parameters and buffers everywhere, and every optimiser
    stepping on the gradients averaged across ranks."""
    if not world.distributed:
        return
    for module in algo.modules.values():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)
    in_modules = {id(p) for m in algo.modules.values() for p in m.parameters()}
    for optimizer in algo.optimizers.values():
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer._batchrl_pending = {}  # id -> parameter whose gradient accumulated since the last reduction
        for param in params:
            if id(param) not in in_modules:  # a bare parameter (a temperature, a multiplier)
                dist.broadcast(param.data, src=0)
            param.register_post_accumulate_grad_hook(_mark(optimizer._batchrl_pending))
        optimizer._batchrl_order = params
        optimizer._batchrl_size = world.size
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: reduce_gradients(opt))


def _mark(pending: dict):
    def hook(param: torch.Tensor) -> None:
        pending[id(param)] = param

    return hook


def reduce_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Average across ranks the gradients accumulated for ``optimizer`` since its last reduction, as one flat
    all-reduce (in the optimizer's parameter order, the same on every rank). A no-op in one process and when
    nothing is pending (e.g. a second call before the step)."""
    pending = getattr(optimizer, "_batchrl_pending", None)
    if not pending:
        return
    grads = [p.grad for p in optimizer._batchrl_order if id(p) in pending]
    pending.clear()
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(optimizer._batchrl_size)
    at = 0
    for g in grads:
        g.copy_(flat[at:at + g.numel()].view_as(g))
        at += g.numel()


def average(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the ranks (no gradient flows through it); ``value`` itself in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on one (a stop signal that reached only some)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather(obj, world: World) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def digest(algo) -> dict[str, str]:
    """A hash of each module's and optimiser's state (to find a rank that left the others)."""
    out = {}
    state = algo.state_dict()
    for group in ("modules", "optimizers"):
        for name, part in state[group].items():
            h = hashlib.sha256()
            _feed(h, part)
            out[f"{group}.{name}"] = h.hexdigest()[:16]
    return out


def _feed(h, value) -> None:
    if isinstance(value, torch.Tensor):
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            h.update(str(key).encode())
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            _feed(h, item)
    else:
        h.update(repr(value).encode())


def check_synchronised(algo, world: World) -> None:
    """RuntimeError naming the modules or optimisers whose state differs between ranks."""
    if not world.distributed:
        return
    digests = gather(digest(algo), world)
    apart = sorted(k for k in digests[0] if len({d[k] for d in digests}) > 1)
    if apart:
        raise RuntimeError(f"ranks hold different states of {', '.join(apart)}: data-parallel training left them "
                           "unsynchronised")
