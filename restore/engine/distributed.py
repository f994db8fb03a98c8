"""Multi-GPU / multi-node training and evaluation with ``torchrun`` (PyTorch distributed, not DataParallel).

Launch the usual ``train.py`` through ``torchrun``; nothing else changes::

    torchrun --nproc_per_node 4 train.py --root DATA --trainer MaPLe ...           # one node, 4 GPUs
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 train.py ...  # and node_rank 1

How it works (all of it lives here; the engine calls these helpers at a handful of marked places):

* :func:`init_distributed` starts the process group from ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``
  (set by ``torchrun``): NCCL on CUDA (each process on ``cuda:LOCAL_RANK``), Gloo on CPU. Without
  those variables everything is single-process and none of this code does anything.
* ``DATALOADER.TRAIN_X.BATCH_SIZE`` stays the GLOBAL batch: each rank loads ``batch / world_size``
  images. Rank 0 draws the sample order exactly as a single process would (same sampler, same
  seed) and shares it; every global batch is cut into contiguous per-rank shards
  (:class:`ShardedSampler`). So the global batches are the single-process batches.
* Gradients of the learnable parameters are averaged over ranks after ``backward`` with one
  flattened ``all_reduce`` (:func:`average_gradients`). With equal shards and a loss that is a
  mean over the batch this is exactly the single-process gradient, so the loss curve is the same
  up to float round-off. We do not wrap the model in ``DistributedDataParallel``: prompt methods
  call their model several times per step and read its attributes (MaPLe/PromptSRC under
  DataParallel break on exactly that), and the learnable parameters are tiny, so overlapping
  communication with the backward pass would gain nothing. Trainers that call ``loss.backward()``
  and ``optim.step()`` themselves (the official MaPLe / IVLP / PromptSRC code, CoOp's amp branch)
  are covered too: every registered optimizer gets a step pre-hook, and every ``GradScaler`` on the
  trainer a pre-``unscale_`` step, that average whatever :func:`average_gradients` has not already
  averaged (:func:`sync_gradients`), so each gradient is averaged exactly once per step and every
  rank skips an inf/NaN step together.
* A loss that is not a mean over samples (a contrastive loss over the batch, an MMD between two
  batches, per-column batch statistics) is computed on the global batch: :func:`all_gather_rows`
  concatenates every rank's rows and carries gradients back to each rank's own rows, summed over
  the ranks that used them. Every rank then computes the same global loss ``L`` and its rows get
  ``world_size * dL/drow``, which :func:`average_gradients` divides back: exactly ``dL/dtheta``.
* Logged scalars are averaged over ranks (:func:`average_summary`), so rank 0 prints the global
  loss. Only rank 0 writes ``log.txt``, TensorBoard, checkpoints and ``results.json``; other ranks'
  stdout is silenced (set ``RESTORE_LOG_ALL_RANKS=1`` to keep it).
* Evaluation is sharded (contiguous chunks, no padding, so no image counts twice); the
  evaluator's per-rank state (counts, predictions) is gathered on rank 0, which computes the
  metrics and shares them (:func:`evaluate`). Accuracy, macro-F1 and per-class results equal a
  single-process evaluation.

Random data augmentation is drawn per rank (different loader-worker seeds), so with random
transforms the runs match one process in distribution, not bit for bit; with deterministic
transforms they match to float round-off. Resuming across nodes needs ``OUTPUT_DIR`` on a shared
filesystem (every rank loads the same checkpoint; a mismatch is an error).
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
import weakref
from collections import defaultdict
from typing import Any, Iterable, Iterator, Sized

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

__all__ = [
    "init_distributed", "is_distributed", "get_rank", "get_world_size", "is_main_process", "barrier",
    "all_reduce_sum", "all_gather_rows", "broadcast_object", "ShardedSampler", "shard_sampler", "average_gradients",
    "average_summary", "broadcast_parameters", "evaluate", "check_same", "sync_gradients",
    "install_gradient_sync", "install_scaler_sync",
]


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def is_distributed() -> bool:
    """True once a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's global rank (from ``RANK`` before the group starts; 0 when single-process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def get_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_main_process() -> bool:
    """Rank 0 (or a single process): the only one that writes files."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_distributed(use_cuda: bool = True) -> bool:
    """Start the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); idempotent.

    Returns True when running distributed. On CUDA each process uses ``cuda:LOCAL_RANK`` (set as
    the current device, so ``torch.device("cuda")`` refers to it) and NCCL; otherwise Gloo.
    """
    if dist.is_available() and dist.is_initialized():
        return is_distributed()
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1 or "RANK" not in os.environ:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support.")
    local_rank = _env_int("LOCAL_RANK", 0)
    cuda = use_cuda and torch.cuda.is_available()
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} visible GPU(s): "
                               "use --nproc_per_node <= the number of GPUs per node.")
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=60)}
    if cuda:
        kwargs["device_id"] = torch.device("cuda", local_rank)
    try:
        dist.init_process_group(**kwargs)
    except TypeError:  # older torch without device_id
        kwargs.pop("device_id", None)
        dist.init_process_group(**kwargs)
    atexit.register(_shutdown)
    if dist.get_rank() != 0 and os.environ.get("RESTORE_LOG_ALL_RANKS", "0") != "1":
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    if dist.get_rank() == 0:
        print(f"Distributed: {dist.get_world_size()} processes ({backend}); the configured batch sizes are "
              "global (per-rank batch = batch / world size)")
    return dist.get_world_size() > 1


def _shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _device() -> torch.device:
    """The device collectives run on (NCCL needs CUDA tensors)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value: int | float) -> int | float:
    """Sum a Python number over ranks (identity when single-process)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    out = t.item()
    return int(round(out)) if isinstance(value, int) else out


class _GatherRows(torch.autograd.Function):
    """Differentiable all-gather along dim 0; backward is a sum reduce-scatter (all_reduce, own slice)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        tensor = tensor.contiguous()
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()  # all_reduce is in place; autograd may share grad buffers
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order (identity when single-process).

    With :class:`ShardedSampler`'s contiguous training shards this is the single-process batch.
    Differentiable: each rank's rows receive the sum over ranks of their gradient, as
    ``torch.distributed.nn.functional.all_gather`` (deprecated in recent torch); with the same loss
    on every rank followed by :func:`average_gradients` that is the single-process gradient. The
    shape must be the same on every rank (equal training shards).
    """
    if not is_distributed():
        return tensor
    return _GatherRows.apply(tensor)


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a same-shape ``tensor`` (identity when single-process), differentiable.

    For a per-rank mean over an equal training shard this is the single-process batch mean; as with
    :func:`all_gather_rows`, the same loss on every rank then gives the single-process gradient.
    """
    if not is_distributed():
        return tensor
    return all_gather_rows(tensor.unsqueeze(0)).mean(dim=0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (identity when single-process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def check_same(value: int | float, what: str) -> None:
    """Raise on every rank if ``value`` differs between ranks (e.g. the resumed epoch)."""
    if not is_distributed():
        return
    t = torch.tensor([float(value), -float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if t[0].item() != -t[1].item():
        raise RuntimeError(f"Ranks disagree on {what} (between {-t[1].item():g} and {t[0].item():g}). With several "
                           "nodes OUTPUT_DIR (and --resume) must be on a filesystem every node sees.")


# --------------------------------------------------------------------------- data


class ShardedSampler(Sampler):
    """This rank's share of every global batch drawn by ``base`` (a single-process sampler).

    Rank 0 iterates ``base`` (exactly as one process would) and broadcasts the order; it is cut
    into global batches of ``batch_size`` and rank ``r`` gets the ``r``-th contiguous shard of
    each. Training (``drop_last``): only full global batches, equal shards of
    ``batch_size / world_size``. Evaluation: the whole order split into ``world_size`` contiguous
    chunks (sizes differ by at most one), so every item is seen exactly once.
    """

    def __init__(self, base: Iterable[int] | Sized, batch_size: int, drop_last: bool, rank: int, world_size: int) -> None:
        self.base, self.batch_size, self.drop_last = base, batch_size, drop_last
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size if drop_last else batch_size

    def _bounds(self, n: int) -> tuple[int, int]:
        per, extra = divmod(n, self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return start, start + per + (1 if self.rank < extra else 0)

    def __iter__(self) -> Iterator[int]:
        # every rank draws (the global RNG stays in step across ranks); rank 0's order is used
        drawn = list(iter(self.base))  # type: ignore[call-overload]
        order = broadcast_object(drawn if self.rank == 0 or not is_distributed() else None)
        if not self.drop_last:
            start, stop = self._bounds(len(order))
            return iter(order[start:stop])
        b, lb = self.batch_size, self.local_batch
        mine: list[int] = []
        for i in range(len(order) // b):
            mine.extend(order[i * b + self.rank * lb: i * b + (self.rank + 1) * lb])
        return iter(mine)

    def __len__(self) -> int:
        n = len(self.base)  # type: ignore[arg-type]
        if self.drop_last:
            return n // self.batch_size * self.local_batch
        start, stop = self._bounds(n)
        return stop - start


def shard_sampler(sampler: Any, batch_size: int, is_train: bool, num_items: int) -> tuple[Any, int]:
    """(sampler, per-rank batch size) for a loader; unchanged when single-process.

    ``batch_size`` is the global batch. Training needs it divisible by the world size and at least
    one full global batch (as Dassl drops the last incomplete training batch).
    """
    if not is_distributed():
        return sampler, batch_size
    world = get_world_size()
    if is_train:
        if batch_size % world:
            raise ValueError(f"The training batch size ({batch_size}) is global and must be divisible by the number "
                             f"of processes ({world}); set DATALOADER.TRAIN_X.BATCH_SIZE to a multiple of {world}.")
        if num_items < batch_size:
            raise ValueError(f"Only {num_items} training images for a global batch of {batch_size}: with "
                             f"{world} processes lower DATALOADER.TRAIN_X.BATCH_SIZE to at most {num_items}.")
        return ShardedSampler(sampler, batch_size, True, get_rank(), world), batch_size // world
    return ShardedSampler(sampler, batch_size, False, get_rank(), world), batch_size


# --------------------------------------------------------------------------- training


def _params(models: nn.Module | Iterable[nn.Module | nn.Parameter | torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(models, (nn.Module, torch.Tensor)):
        models = [models]
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    for m in models:
        params = m.parameters() if isinstance(m, nn.Module) else [m]
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def broadcast_parameters(models: nn.Module | Iterable[nn.Module]) -> None:
    """Copy rank 0's learnable parameters to every rank (identical starts even without a seed)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for p in _params(models):
            dist.broadcast(p.data, src=0)


def average_gradients(models: nn.Module | Iterable[nn.Module | nn.Parameter | torch.Tensor]) -> None:
    """Average the gradients of the learnable parameters over ranks (one flattened all_reduce per dtype).

    A parameter without a gradient on every rank keeps ``grad = None`` (as in one process); one
    with a gradient on some ranks only gets zeros on the others before averaging.
    """
    if not is_distributed():
        return
    params = _params(models)
    if not params:
        return
    _average(params)
    _mark_synced(params)


def _average(params: list[torch.Tensor]) -> None:
    device = _device()
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    active = [p for p, h in zip(params, has.tolist()) if h > 0]
    for p in active:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world = get_world_size()
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in active:
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for (_, grad_device), group in by_dtype.items():
        flat = torch.cat([p.grad.reshape(-1) for p in group]).to(device)
        dist.all_reduce(flat)
        flat.div_(world)
        flat = flat.to(grad_device)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


# Gradients already averaged, so that the safety nets below average each gradient exactly once:
# id(param) -> (weakref to param, weakref to its grad tensor or None, the grad's version counter).
# A new backward pass makes a new grad tensor or bumps the version of the old one in place.
_synced: dict[int, tuple[Any, Any, int]] = {}


def _mark_synced(params: list[torch.Tensor]) -> None:
    for p in params:
        g = p.grad
        _synced[id(p)] = (weakref.ref(p), weakref.ref(g) if g is not None else None, g._version if g is not None else 0)


def _is_synced(p: torch.Tensor) -> bool:
    entry = _synced.get(id(p))
    if entry is None or entry[0]() is not p:
        return False
    if p.grad is None:
        return entry[1] is None
    return entry[1] is not None and entry[1]() is p.grad and entry[2] == p.grad._version


def sync_gradients(params: Iterable[nn.Parameter | torch.Tensor]) -> None:
    """Average the gradients of ``params`` over ranks unless :func:`average_gradients` already did since
    they last changed (decided jointly by all ranks, so the collectives always match)."""
    if not is_distributed():
        return
    params = _params(params)
    if not params:
        return
    need = torch.tensor([not _is_synced(p) for p in params], dtype=torch.float32, device=_device())
    dist.all_reduce(need, op=dist.ReduceOp.MAX)
    todo = [p for p, n in zip(params, need.tolist()) if n > 0]
    if todo:
        average_gradients(todo)


def _optimizer_params(optimizer: Any) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def install_gradient_sync(optimizer: Any) -> None:
    """DDP safety net for trainers that call ``loss.backward()`` and ``optim.step()`` themselves (the
    official MaPLe / IVLP / PromptSRC code; CoOp's amp branch) instead of ``model_backward``: a step
    pre-hook averages the optimizer's gradients over ranks unless that already happened. Idempotent;
    a no-op when single-process or for an object without ``register_step_pre_hook``."""
    if not is_distributed() or optimizer is None or getattr(optimizer, "_restore_grad_sync", False):
        return
    register = getattr(optimizer, "register_step_pre_hook", None)
    if register is None:
        return
    register(lambda opt, args, kwargs: sync_gradients(_optimizer_params(opt)))
    optimizer._restore_grad_sync = True


def install_scaler_sync(scaler: Any) -> None:
    """The same for a ``GradScaler``: average before ``unscale_`` looks for inf/NaN, so every rank
    skips or takes the step together (a per-rank check would leave one rank stepping alone)."""
    if not is_distributed() or getattr(scaler, "_restore_grad_sync", False) or not hasattr(scaler, "unscale_"):
        return
    original = scaler.unscale_

    def unscale_(optimizer: Any) -> None:
        params = _optimizer_params(optimizer)
        sync_gradients(params)
        original(optimizer)
        _mark_synced(_params(params))  # unscaled in place: still averaged

    scaler.unscale_ = unscale_
    scaler._restore_grad_sync = True


def average_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """Average the logged scalars over ranks (so rank 0 logs the global batch's values)."""
    if not is_distributed() or not summary:
        return summary
    keys = [k for k, v in summary.items() if isinstance(v, (int, float, torch.Tensor))]
    values = [float(summary[k].item() if isinstance(summary[k], torch.Tensor) else summary[k]) for k in keys]
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    t /= get_world_size()
    return {**summary, **dict(zip(keys, t.tolist()))}


# --------------------------------------------------------------------------- evaluation


def _merge(states: list[dict[str, Any]]) -> dict[str, Any]:
    merged = dict(states[0])
    for state in states[1:]:
        for key, value in state.items():
            cur = merged.get(key)
            if isinstance(value, bool) or cur is None:
                continue
            if isinstance(value, (int, float)):
                merged[key] = cur + value
            elif isinstance(value, list):
                merged[key] = cur + value
            elif isinstance(value, dict) and all(isinstance(v, list) for v in value.values()):
                out = defaultdict(list) if isinstance(cur, defaultdict) else {}
                for d in (cur, value):
                    for k, v in d.items():
                        out[k] = out.get(k, []) + list(v)
                merged[key] = out
    return merged


_EVAL_SKIP = {"cfg", "_lab2cname"}


def evaluate(evaluator: Any) -> Any:
    """``evaluator.evaluate()`` over the union of every rank's shard; the result on every rank.

    The evaluator's accumulated state (numbers summed, lists concatenated in rank order, dicts of
    lists merged) is gathered on rank 0, which evaluates (printing, files) and shares the result.
    """
    if not is_distributed():
        return evaluator.evaluate()
    state = {k: v for k, v in vars(evaluator).items() if k not in _EVAL_SKIP
             and isinstance(v, (int, float, list, dict))}
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, state)
    results = None
    if is_main_process():
        for key, value in _merge(gathered).items():
            setattr(evaluator, key, value)
        results = evaluator.evaluate()
    return broadcast_object(results)
