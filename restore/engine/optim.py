"""Optimizers and LR schedulers with Dassl's names and numerics, working on current PyTorch.

Differences from Dassl 0.6.3 that matter: the warmup schedulers do not pass ``verbose`` (removed
from PyTorch), and their state dicts hold the successor's *state dict*, not the successor object,
so checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

AVAILABLE_OPTIMIZERS = ["adam", "amsgrad", "sgd", "rmsprop", "radam", "adamw"]
AVAILABLE_SCHEDULERS = ["single_step", "multi_step", "cosine"]


def build_optimizer(model: nn.Module | Iterable[Any], optim_cfg: Any, param_groups: list[dict] | None = None
                    ) -> torch.optim.Optimizer:
    """Build the optimizer named ``optim_cfg.NAME`` over a module's parameters or a parameter list."""
    name = optim_cfg.NAME
    if name not in AVAILABLE_OPTIMIZERS:
        raise ValueError(f"optim must be one of {AVAILABLE_OPTIMIZERS}, but got {name!r}")
    lr, wd = optim_cfg.LR, optim_cfg.WEIGHT_DECAY
    if param_groups is not None:
        params: Any = param_groups
    elif isinstance(model, nn.Module):
        if optim_cfg.STAGED_LR:
            new_layers = list(optim_cfg.NEW_LAYERS) if not isinstance(optim_cfg.NEW_LAYERS, str) else [optim_cfg.NEW_LAYERS]
            if not new_layers:
                raise ValueError("OPTIM.STAGED_LR is True but OPTIM.NEW_LAYERS is empty")
            base: list[nn.Parameter] = []
            new: list[nn.Parameter] = []
            for child_name, module in model.named_children():
                (new if child_name in new_layers else base).extend(module.parameters())
            params = [{"params": base, "lr": lr * optim_cfg.BASE_LR_MULT}, {"params": new}]
        else:
            params = model.parameters()
    else:
        params = model
    betas = (optim_cfg.ADAM_BETA1, optim_cfg.ADAM_BETA2)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, betas=betas)
    if name == "amsgrad":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, betas=betas, amsgrad=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=optim_cfg.MOMENTUM, weight_decay=wd,
                               dampening=optim_cfg.SGD_DAMPNING, nesterov=optim_cfg.SGD_NESTEROV)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=optim_cfg.MOMENTUM, weight_decay=wd,
                                   alpha=optim_cfg.RMSPROP_ALPHA)
    if name == "radam":
        return torch.optim.RAdam(params, lr=lr, weight_decay=wd, betas=betas)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=betas)


class _BaseWarmupScheduler(LRScheduler):
    """Runs a warmup for ``warmup_epoch`` steps, then delegates every step to ``successor``."""

    def __init__(self, optimizer: torch.optim.Optimizer, successor: LRScheduler, warmup_epoch: int,
                 last_epoch: int = -1) -> None:
        self.successor = successor
        self.warmup_epoch = warmup_epoch
        super().__init__(optimizer, last_epoch)

    def step(self, epoch: int | None = None) -> None:  # type: ignore[override]
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)

    def state_dict(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "successor")}
        state["successor"] = self.successor.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        successor = state.pop("successor", None)
        if isinstance(successor, dict):
            self.successor.load_state_dict(successor)
        elif successor is not None:  # written by the original Dassl: a pickled scheduler object
            self.successor.load_state_dict(successor.state_dict())
        self.__dict__.update(state)


class ConstantWarmupScheduler(_BaseWarmupScheduler):
    """LR = ``cons_lr`` during warmup."""

    def __init__(self, optimizer: torch.optim.Optimizer, successor: LRScheduler, warmup_epoch: int,
                 cons_lr: float, last_epoch: int = -1) -> None:
        self.cons_lr = cons_lr
        super().__init__(optimizer, successor, warmup_epoch, last_epoch)

    def get_lr(self) -> list[float | torch.Tensor]:
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]


class LinearWarmupScheduler(_BaseWarmupScheduler):
    """LR = ``min_lr`` at step 0, then ``base_lr * step / warmup_epoch``."""

    def __init__(self, optimizer: torch.optim.Optimizer, successor: LRScheduler, warmup_epoch: int,
                 min_lr: float, last_epoch: int = -1) -> None:
        self.min_lr = min_lr
        super().__init__(optimizer, successor, warmup_epoch, last_epoch)

    def get_lr(self) -> list[float | torch.Tensor]:
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        if self.last_epoch == 0:
            return [self.min_lr for _ in self.base_lrs]
        return [lr * self.last_epoch / self.warmup_epoch for lr in self.base_lrs]


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: Any) -> LRScheduler:
    """Build ``optim_cfg.LR_SCHEDULER`` with optional constant/linear warmup (stepped once per epoch)."""
    name = optim_cfg.LR_SCHEDULER
    max_epoch = optim_cfg.MAX_EPOCH
    if name not in AVAILABLE_SCHEDULERS:
        raise ValueError(f"scheduler must be one of {AVAILABLE_SCHEDULERS}, but got {name!r}")
    stepsize = optim_cfg.STEPSIZE
    if name == "single_step":
        step = stepsize[-1] if isinstance(stepsize, (list, tuple)) else stepsize
        scheduler: LRScheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=max_epoch if step <= 0 else step, gamma=optim_cfg.GAMMA)
    elif name == "multi_step":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(stepsize), gamma=optim_cfg.GAMMA)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=float(max_epoch))
    if optim_cfg.WARMUP_EPOCH > 0:
        if not optim_cfg.WARMUP_RECOUNT:
            scheduler.last_epoch = optim_cfg.WARMUP_EPOCH
        if optim_cfg.WARMUP_TYPE == "constant":
            return ConstantWarmupScheduler(optimizer, scheduler, optim_cfg.WARMUP_EPOCH, optim_cfg.WARMUP_CONS_LR)
        if optim_cfg.WARMUP_TYPE == "linear":
            return LinearWarmupScheduler(optimizer, scheduler, optim_cfg.WARMUP_EPOCH, optim_cfg.WARMUP_MIN_LR)
        raise ValueError(f"OPTIM.WARMUP_TYPE must be 'constant' or 'linear', got {optim_cfg.WARMUP_TYPE!r}")
    return scheduler
