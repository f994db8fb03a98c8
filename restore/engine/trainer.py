"""Dassl-compatible trainers: TrainerBase -> SimpleTrainer -> TrainerX / TrainerXU.

Hooks, call order, checkpoint dict and file names, log lines and the ``=> result`` block follow
Dassl 0.6.3 (see shared/reference/dassl_compat.md). Additions: every evaluation writes
``results.json`` atomically; checkpoints carry RNG states (exact resume) and a little metadata
(trainer, backbone) checked on load; a non-finite loss names the epoch and batch.
"""

from __future__ import annotations

import datetime
import functools
import os
import os.path as osp
import random
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import distributed  # DDP (torchrun) hooks, marked '# DDP' below
from .evaluator import build_evaluator
from .registry import TRAINER_REGISTRY, check_availability, lookup_case_insensitive
from .utils import (AverageMeter, MetricMeter, atomic_write_bytes, atomic_write_json,
                    checkpoint_pointer, load_checkpoint, mkdir_if_missing, resume_advice, save_checkpoint)

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.yaml"


@functools.lru_cache(maxsize=1)
def software_versions() -> dict[str, Any]:
    """Versions a result depends on: python, torch (+ CUDA), torchvision, open_clip, this library and
    its git commit when run from a checkout (None otherwise). Looked up once per process (copy before
    changing it)."""
    import platform
    import subprocess

    import restore

    def version(module: str) -> str | None:
        try:
            return str(__import__(module).__version__)
        except Exception:  # noqa: BLE001 - optional or versionless package
            return None

    try:
        repo = osp.dirname(osp.dirname(osp.abspath(restore.__file__)))
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git, not a checkout
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "torchvision": version("torchvision"), "open_clip": version("open_clip"),
            "restore": restore.__version__, "git_commit": commit}


def capture_rng_state() -> dict[str, Any]:
    """RNG states of random, numpy and torch in a weights-only-loadable form."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    if not state:
        return
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainerBase:
    """Model registry, checkpointing and the epoch loop skeleton."""

    def __init__(self) -> None:
        self._models: "OrderedDict[str, nn.Module]" = OrderedDict()
        self._optims: "OrderedDict[str, Any]" = OrderedDict()
        self._scheds: "OrderedDict[str, Any]" = OrderedDict()
        self._writer = None

    def register_model(self, name: str = "model", model: nn.Module | None = None, optim: Any = None,
                       sched: Any = None) -> None:
        if self.__dict__.get("_models") is None:
            raise AttributeError("Cannot assign model before super().__init__() call")
        if name in self._models:
            raise AssertionError("Found duplicate model names")
        self._models[name] = model
        self._optims[name] = optim
        self._scheds[name] = sched
        # DDP: trainers that call loss.backward() / optim.step() themselves (official MaPLe, IVLP,
        # PromptSRC; CoOp's amp branch) still get averaged gradients, exactly once per step
        distributed.install_gradient_sync(optim)

    def install_scaler_sync(self) -> None:
        """DDP: every ``GradScaler`` attribute of the trainer averages gradients before its inf/NaN check."""
        if not distributed.is_distributed():
            return
        kinds = tuple(k for k in (getattr(torch.amp, "GradScaler", None), getattr(torch.cuda.amp, "GradScaler", None))
                      if isinstance(k, type))  # torch.amp.GradScaler is torch >= 2.3
        for value in list(vars(self).values()):
            if kinds and isinstance(value, kinds):
                distributed.install_scaler_sync(value)

    def get_model_names(self, names: str | list[str] | None = None) -> list[str]:
        names_real = list(self._models.keys())
        if names is not None:
            names = [names] if isinstance(names, str) else list(names)
            for name in names:
                assert name in names_real, f"Unknown model name {name!r}; registered: {names_real}"
            return names
        return names_real

    # --- checkpoint content hooks (overridden by prompt trainers to save only what is learned) ---
    def checkpoint_state_dict(self, name: str) -> "OrderedDict[str, torch.Tensor]":
        return self._models[name].state_dict()

    def load_checkpoint_state_dict(self, name: str, state_dict: dict[str, torch.Tensor], path: str) -> None:
        self._models[name].load_state_dict(state_dict, strict=True)

    def checkpoint_metadata(self) -> dict[str, Any]:
        return {}

    def capture_rng_state(self) -> dict[str, Any]:
        """Global RNG states (they also drive the loaders' shuffling): resuming replays the same batches."""
        return capture_rng_state()

    def restore_rng_state(self, state: dict[str, Any] | None) -> None:
        if state:
            restore_rng_state(state)

    def check_checkpoint_metadata(self, checkpoint: dict[str, Any], path: str) -> None:
        pass

    def save_model(self, epoch: int, directory: str, is_best: bool = False, val_result: float | None = None,
                   model_name: str = "") -> list[str]:
        if not distributed.is_main_process():  # DDP: only rank 0 writes checkpoints
            return []
        paths = []
        for name in self.get_model_names():
            optim, sched = self._optims[name], self._scheds[name]
            state = {
                "state_dict": self.checkpoint_state_dict(name),
                "epoch": epoch + 1,
                "optimizer": optim.state_dict() if optim is not None else None,
                "scheduler": sched.state_dict() if sched is not None else None,
                "val_result": val_result,
                "rng_state": self.capture_rng_state(),
                **self.checkpoint_metadata(),
            }
            paths.append(save_checkpoint(state, osp.join(directory, name), is_best=is_best, model_name=model_name))
        return paths

    def resume_model_if_exist(self, directory: str) -> int:
        names = self.get_model_names()
        if not names or not all(osp.isfile(osp.join(directory, n, "checkpoint")) for n in names):
            print("No checkpoint found, train from scratch")
            return 0
        print(f"Found checkpoint at {directory} (will resume training)")
        start_epoch = 0
        for name in names:
            fpath = checkpoint_pointer(osp.join(directory, name))
            checkpoint = load_checkpoint(fpath, corrupted_advice=resume_advice(fpath))
            self.check_checkpoint_metadata(checkpoint, fpath)
            self.load_checkpoint_state_dict(name, checkpoint["state_dict"], fpath)
            print("Loaded model weights")
            if self._optims[name] is not None and checkpoint.get("optimizer"):
                self._optims[name].load_state_dict(checkpoint["optimizer"])
                print("Loaded optimizer")
            if self._scheds[name] is not None and checkpoint.get("scheduler"):
                self._scheds[name].load_state_dict(checkpoint["scheduler"])
                print("Loaded scheduler")
            start_epoch = checkpoint["epoch"]
            self.restore_rng_state(checkpoint.get("rng_state"))
            print(f"Previous epoch: {start_epoch}")
        return start_epoch

    def load_model(self, directory: str, epoch: int | None = None) -> None:
        """Load ``model-best.pth.tar`` or ``model.pth.tar-<epoch>`` of every registered model."""
        if not directory:
            print("Note that load_model() is skipped as no pretrained model is given")
            return
        names = self.get_model_names()
        if not osp.isdir(directory):
            raise FileNotFoundError(f"--model-dir {directory!r} does not exist. Point it at a training output folder.")
        for name in names:
            fdir = osp.join(directory, name)
            fname = "model-best.pth.tar" if epoch is None else f"model.pth.tar-{epoch}"
            fpath = osp.join(fdir, fname)
            if epoch is None and not osp.exists(fpath) and osp.isfile(osp.join(fdir, "checkpoint")):
                fpath = checkpoint_pointer(fdir)
            if not osp.exists(fpath):
                available = sorted(f for f in os.listdir(fdir) if f.startswith("model")) if osp.isdir(fdir) else []
                hint = (f" Available in {fdir}: {available}; pass --load-epoch with one of their numbers."
                        if available else f" No checkpoint of model {name!r} in {directory}; was it trained there?")
                raise FileNotFoundError(f'Model not found at "{fpath}".{hint}')
            checkpoint = load_checkpoint(fpath)
            self.check_checkpoint_metadata(checkpoint, fpath)
            self.load_checkpoint_state_dict(name, checkpoint["state_dict"], fpath)
            self.loaded_epoch = checkpoint.get("epoch")
            val = checkpoint.get("val_result", checkpoint.get("result"))
            val_str = f", val_result={val:.1f}" if isinstance(val, (int, float)) else ""
            print(f'Loading weights to {name} from "{fpath}" (epoch = {self.loaded_epoch}{val_str})')

    def set_model_mode(self, mode: str = "train", names: str | list[str] | None = None) -> None:
        for name in self.get_model_names(names):
            if mode == "train":
                self._models[name].train()
            elif mode in ("test", "eval"):
                self._models[name].eval()
            else:
                raise KeyError(mode)

    def update_lr(self, names: str | list[str] | None = None) -> None:
        for name in self.get_model_names(names):
            if self._scheds[name] is not None:
                self._scheds[name].step()

    def detect_anomaly(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).all():
            epoch = getattr(self, "epoch", 0) + 1
            where = (f" at epoch {epoch}/{getattr(self, 'max_epoch', '?')}, batch "
                     f"{getattr(self, 'batch_idx', 0) + 1}/{getattr(self, 'num_batches', '?')}")
            raise FloatingPointError(
                f"Loss is infinite or NaN{where}. Training stopped; the last good checkpoint in "
                f"{getattr(self, 'output_dir', '?')} is kept. Lower OPTIM.LR or use PREC fp32/amp.")

    def init_writer(self, log_dir: str) -> None:
        """TensorBoard is optional: used only if installed (``log_dir`` is created only then)."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # noqa: BLE001 - tensorboard is optional
            return
        mkdir_if_missing(log_dir)
        print(f"Initialize tensorboard (log_dir={log_dir})")
        self._writer = SummaryWriter(log_dir=log_dir)

    def close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def write_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, scalar_value, global_step)

    def train(self, start_epoch: int, max_epoch: int) -> None:
        self.start_epoch = start_epoch
        self.max_epoch = max_epoch
        self.before_train()
        for self.epoch in range(self.start_epoch, self.max_epoch):
            self.before_epoch()
            self.run_epoch()
            self.after_epoch()
        self.after_train()

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_epoch(self) -> None:
        pass

    def after_epoch(self) -> None:
        pass

    def run_epoch(self) -> None:
        raise NotImplementedError

    def test(self, split: str | None = None) -> float:
        raise NotImplementedError

    def parse_batch_train(self, batch: dict[str, Any]) -> Any:
        raise NotImplementedError

    def parse_batch_test(self, batch: dict[str, Any]) -> Any:
        raise NotImplementedError

    def forward_backward(self, batch: Any) -> dict[str, float]:
        raise NotImplementedError

    def model_inference(self, input: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def model_zero_grad(self, names: str | list[str] | None = None) -> None:
        for name in self.get_model_names(names):
            if self._optims[name] is not None:
                self._optims[name].zero_grad()

    def model_backward(self, loss: torch.Tensor) -> None:
        self.detect_anomaly(loss)
        loss.backward()
        distributed.average_gradients(self._models.values())  # DDP: average grads over ranks

    def model_update(self, names: str | list[str] | None = None) -> None:
        for name in self.get_model_names(names):
            if self._optims[name] is not None:
                self._optims[name].step()

    def model_backward_and_update(self, loss: torch.Tensor, names: str | list[str] | None = None) -> None:
        self.model_zero_grad(names)
        self.model_backward(loss)
        self.model_update(names)


class SimpleTrainer(TrainerBase):
    """Builds data, model and evaluator from cfg; owns the test loop and ``results.json``."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.time_created = time.time()
        self.check_cfg(cfg)
        distributed.init_distributed(cfg.USE_CUDA)  # DDP: process group when launched by torchrun
        self.device = torch.device("cuda") if torch.cuda.is_available() and cfg.USE_CUDA else torch.device("cpu")
        self.start_epoch = self.epoch = 0
        self.max_epoch = cfg.OPTIM.MAX_EPOCH
        self.output_dir = cfg.OUTPUT_DIR
        self.cfg = cfg
        self.loaded_epoch: int | None = None
        self.train_images = 0  # global: summed over DDP ranks once per epoch (results.json train_images_per_s)
        self.train_seconds = 0.0  # this rank's training wall time (ranks are in lock-step; rank 0's is written)
        self.build_data_loader()
        self.build_model()
        distributed.broadcast_parameters(self._models.values())  # DDP: same start on every rank
        self.install_scaler_sync()  # DDP
        self.evaluator = build_evaluator(cfg, lab2cname=self.lab2cname)
        self.best_result = -np.inf

    def check_cfg(self, cfg: Any) -> None:
        pass

    def build_data_loader(self) -> None:
        from .data import DataManager

        dm = DataManager(self.cfg)
        self.train_loader_x = dm.train_loader_x
        self.train_loader_u = dm.train_loader_u
        self.val_loader = dm.val_loader
        self.test_loader = dm.test_loader
        self.num_classes = dm.num_classes
        self.num_source_domains = dm.num_source_domains
        self.lab2cname = dm.lab2cname
        self.dm = dm

    def build_model(self) -> None:
        raise NotImplementedError("A trainer must build and register its model in build_model()")

    def train(self) -> None:  # type: ignore[override]
        super().train(self.start_epoch, self.max_epoch)

    def before_train(self) -> None:
        directory = self.cfg.RESUME or self.output_dir
        self.start_epoch = self.resume_model_if_exist(directory)
        distributed.check_same(self.start_epoch, "the resumed epoch")  # DDP
        self._resume_only_paths = self.resumed_resume_only_paths(directory)
        self.install_scaler_sync()  # DDP: a scaler built after build_model
        if self.start_epoch < self.max_epoch and distributed.is_main_process():  # DDP: rank 0 logs
            self.init_writer(osp.join(self.output_dir, "tensorboard"))
        self.time_start = time.time()

    def after_epoch(self) -> None:
        last_epoch = (self.epoch + 1) == self.max_epoch
        do_test = not self.cfg.TEST.NO_TEST
        freq = self.cfg.TRAIN.CHECKPOINT_FREQ
        meet_checkpoint_freq = (self.epoch + 1) % freq == 0 if freq > 0 else False
        if do_test and self.cfg.TEST.FINAL_MODEL == "best_val":
            curr_result = self.test(split="val")
            if curr_result > self.best_result:
                self.best_result = curr_result
                self.save_model(self.epoch, self.output_dir, val_result=curr_result, model_name="model-best.pth.tar")
        self.save_epoch_checkpoint(keep=meet_checkpoint_freq or last_epoch)

    def keeps_checkpoint(self, epoch: int) -> bool:
        """Whether ``model.pth.tar-<epoch>`` stays for good: the last epoch and every CHECKPOINT_FREQ-th."""
        freq = self.cfg.TRAIN.CHECKPOINT_FREQ
        return epoch == self.max_epoch or (freq > 0 and epoch % freq == 0)

    def resumed_resume_only_paths(self, directory: str) -> list[str]:
        """After resuming in OUTPUT_DIR from epoch N: N's files if they were kept only for resuming (the
        killed run would have removed them after epoch N + 1), so the next save removes them."""
        epoch = self.start_epoch
        if (epoch <= 0 or self.keeps_checkpoint(epoch) or not distributed.is_main_process()
                or osp.realpath(directory) != osp.realpath(self.output_dir)):  # never delete in another run's folder
            return []
        return [osp.join(self.output_dir, name, f"model.pth.tar-{epoch}") for name in self.get_model_names()]

    def save_epoch_checkpoint(self, keep: bool) -> None:
        """Save this epoch (a killed run resumes here). Files saved only for resuming are removed
        once a newer checkpoint exists (also those of a killed run this one resumed), so by default
        only ``model.pth.tar-MAX_EPOCH`` remains, as in Dassl."""
        paths = self.save_model(self.epoch, self.output_dir)
        for path in getattr(self, "_resume_only_paths", []):
            if path not in paths:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
        self._resume_only_paths = [] if keep else paths

    def after_train(self) -> None:
        print("Finish training")
        do_test = not self.cfg.TEST.NO_TEST
        if do_test:
            if self.cfg.TEST.FINAL_MODEL == "best_val":
                print("Deploy the model with the best val performance")
                distributed.barrier()  # DDP: rank 0 has written model-best
                self.load_model(self.output_dir)
            else:
                print("Deploy the last-epoch model")
            self.test()
        elapsed = round(time.time() - self.time_start)
        print(f"Elapsed: {datetime.timedelta(seconds=elapsed)}")
        self.close_writer()

    @torch.no_grad()
    def test(self, split: str | None = None) -> float:
        """Evaluate on ``split`` (default TEST.SPLIT), print Dassl's block and write results.json."""
        self.set_model_mode("eval")
        self.evaluator.reset()
        split = split or self.cfg.TEST.SPLIT
        if split == "val" and self.val_loader is not None:
            data_loader = self.val_loader
        else:
            split = "test"
            data_loader = self.test_loader
        print(f"Evaluate on the *{split}* set")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start, images = time.time(), 0
        with self.inference_context():
            for batch in tqdm(data_loader, desc=f"eval {split}", leave=False, dynamic_ncols=True):
                input, label = self.parse_batch_test(batch)
                output = self.model_inference(input)
                self.evaluator.process(output, label)
                images += label.shape[0]
        seconds = time.time() - start
        results = distributed.evaluate(self.evaluator)  # DDP: metrics over every rank's shard
        images = distributed.all_reduce_sum(images)  # DDP
        for k, v in results.items():
            self.write_scalar(f"{split}/{k}", v, self.epoch)
        if split == "test":
            self.write_results(results, split, images, seconds)
        return list(results.values())[0]

    def inference_context(self) -> Any:
        """A context manager for the whole evaluation loop (prompt trainers cache text features)."""
        import contextlib

        return contextlib.nullcontext()

    def results_metadata(self) -> dict[str, Any]:
        return {}

    def write_results(self, results: dict[str, float], split: str, images: int, seconds: float) -> str:
        """Write ``OUTPUT_DIR/results.json`` (atomically) for scripts and aggregation."""
        path = osp.join(self.output_dir, RESULTS_FILE)
        if not distributed.is_main_process():  # DDP: only rank 0 writes results
            return path
        cfg = self.cfg
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        if peak is None:
            try:
                import resource

                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB
            except Exception:  # noqa: BLE001
                peak = None
        epoch = self.loaded_epoch if self.loaded_epoch is not None else (self.epoch + 1 if self.train_images else 0)
        record = {
            "accuracy": results["accuracy"],
            "macro_f1": results.get("macro_f1"),
            "error_rate": results.get("error_rate"),
            "trainer": cfg.TRAINER.NAME,
            "dataset": cfg.DATASET.NAME,
            "split": cfg.DATASET.SUBSAMPLE_CLASSES,
            "eval_split": split,
            "num_classes": self.num_classes,
            "num_test_images": images,
            "num_shots": cfg.DATASET.NUM_SHOTS,
            "seed": cfg.SEED if cfg.SEED >= 0 else "unseeded",
            "backbone": cfg.MODEL.BACKBONE.NAME,
            "protocol": cfg.PROTOCOL,
            "epoch": epoch,
            "wall_time_s": round(time.time() - getattr(self, "time_created", time.time()), 3),
            "eval_time_s": round(seconds, 3),
            "eval_images_per_s": round(images / seconds, 2) if seconds > 0 else None,
            "train_images_per_s": round(self.train_images / self.train_seconds, 2) if self.train_seconds else None,
            "peak_memory_mb": round(peak, 1) if peak is not None else None,
            "device": str(self.device),
            "precision": str(getattr(self, "precision", "")) or None,
            "versions": dict(software_versions()),
            **self.results_metadata(),
        }
        shots_per_class = getattr(getattr(self, "dm", None), "shots_per_class", None)
        if shots_per_class is not None:
            record["shots_per_class"] = shots_per_class  # train images per label: fewer than num_shots if scarce
        if "perclass_accuracy" in results:
            record["perclass_accuracy"] = results["perclass_accuracy"]
        path = osp.join(self.output_dir, RESULTS_FILE)
        # the whole config beside the numbers: what a table row was computed with, loadable by yacs
        atomic_write_bytes(cfg.dump().encode(), osp.join(self.output_dir, CONFIG_FILE))
        atomic_write_json(record, path)
        print(f"Results written to {path}")
        return path

    def model_inference(self, input: torch.Tensor) -> torch.Tensor:
        return self.model(input)

    def parse_batch_test(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["img"].to(self.device), batch["label"].to(self.device)

    def get_current_lr(self, names: str | list[str] | None = None) -> float:
        name = self.get_model_names(names)[0]
        return self._optims[name].param_groups[0]["lr"]


class TrainerX(SimpleTrainer):
    """Trainer over labelled data only; every prompt trainer subclasses it."""

    def run_epoch(self) -> None:
        self.set_model_mode("train")
        losses = MetricMeter()
        batch_time, data_time = AverageMeter(), AverageMeter()
        self.num_batches = len(self.train_loader_x)
        images = 0  # this rank's; summed over ranks at the end of the epoch
        end = epoch_start = time.time()
        for self.batch_idx, batch in enumerate(self.train_loader_x):
            data_time.update(time.time() - end)
            loss_summary = distributed.average_summary(self.forward_backward(batch))  # DDP: global values
            batch_time.update(time.time() - end)
            losses.update(loss_summary)
            images += int(batch["label"].shape[0]) if isinstance(batch, dict) else 0
            meet_freq = (self.batch_idx + 1) % self.cfg.TRAIN.PRINT_FREQ == 0
            only_few_batches = self.num_batches < self.cfg.TRAIN.PRINT_FREQ
            if meet_freq or only_few_batches:
                nb_remain = self.num_batches - self.batch_idx - 1
                nb_remain += (self.max_epoch - self.epoch - 1) * self.num_batches
                eta = str(datetime.timedelta(seconds=int(batch_time.avg * nb_remain)))
                print(" ".join([
                    f"epoch [{self.epoch + 1}/{self.max_epoch}]",
                    f"batch [{self.batch_idx + 1}/{self.num_batches}]",
                    f"time {batch_time.val:.3f} ({batch_time.avg:.3f})",
                    f"data {data_time.val:.3f} ({data_time.avg:.3f})",
                    f"{losses}",
                    f"lr {self.get_current_lr():.4e}",
                    f"eta {eta}",
                ]))
            n_iter = self.epoch * self.num_batches + self.batch_idx
            for name, meter in losses.meters.items():
                self.write_scalar("train/" + name, meter.avg, n_iter)
            self.write_scalar("train/lr", self.get_current_lr(), n_iter)
            end = time.time()
        self.train_seconds += time.time() - epoch_start
        self.train_images += distributed.all_reduce_sum(images)  # DDP: every rank's images (exact if uneven)

    def parse_batch_train(self, batch: dict[str, Any]) -> Any:
        input = batch["img"].to(self.device)
        label = batch["label"].to(self.device)
        domain = batch["domain"].to(self.device)
        return input, label, domain


class TrainerXU(SimpleTrainer):
    """Trainer over labelled (x) and unlabelled (u) batches drawn in step."""

    def run_epoch(self) -> None:
        self.set_model_mode("train")
        losses = MetricMeter()
        batch_time, data_time = AverageMeter(), AverageMeter()
        len_x = len(self.train_loader_x)
        len_u = len(self.train_loader_u) if self.train_loader_u is not None else 0
        count = self.cfg.TRAIN.COUNT_ITER
        if self.train_loader_u is None:
            raise RuntimeError("This trainer needs unlabelled data (train_u) but the dataset provides none.")
        self.num_batches = {"train_x": len_x, "train_u": len_u}.get(count, min(len_x, len_u))
        iter_x, iter_u = iter(self.train_loader_x), iter(self.train_loader_u)
        images = 0  # this rank's; summed over ranks at the end of the epoch
        end = epoch_start = time.time()
        for self.batch_idx in range(self.num_batches):
            try:
                batch_x = next(iter_x)
            except StopIteration:
                iter_x = iter(self.train_loader_x)
                batch_x = next(iter_x)
            try:
                batch_u = next(iter_u)
            except StopIteration:
                iter_u = iter(self.train_loader_u)
                batch_u = next(iter_u)
            data_time.update(time.time() - end)
            loss_summary = distributed.average_summary(self.forward_backward(batch_x, batch_u))  # type: ignore[call-arg]  # DDP
            batch_time.update(time.time() - end)
            losses.update(loss_summary)
            images += int(batch_x["label"].shape[0])
            if (self.batch_idx + 1) % self.cfg.TRAIN.PRINT_FREQ == 0 or self.num_batches < self.cfg.TRAIN.PRINT_FREQ:
                nb_remain = self.num_batches - self.batch_idx - 1 + (self.max_epoch - self.epoch - 1) * self.num_batches
                eta = str(datetime.timedelta(seconds=int(batch_time.avg * nb_remain)))
                print(f"epoch [{self.epoch + 1}/{self.max_epoch}] batch [{self.batch_idx + 1}/{self.num_batches}] "
                      f"time {batch_time.val:.3f} ({batch_time.avg:.3f}) data {data_time.val:.3f} ({data_time.avg:.3f}) "
                      f"{losses} lr {self.get_current_lr():.4e} eta {eta}")
            end = time.time()
        self.train_seconds += time.time() - epoch_start
        self.train_images += distributed.all_reduce_sum(images)  # DDP: every rank's images (exact if uneven)

    def parse_batch_train(self, batch_x: dict[str, Any], batch_u: dict[str, Any]) -> Any:  # type: ignore[override]
        return batch_x["img"].to(self.device), batch_x["label"].to(self.device), batch_u["img"].to(self.device)


def build_trainer(cfg: Any) -> SimpleTrainer:
    """Instantiate the registered trainer ``cfg.TRAINER.NAME`` (case-insensitive alias allowed)."""
    names = TRAINER_REGISTRY.registered_names()
    name = lookup_case_insensitive(TRAINER_REGISTRY, cfg.TRAINER.NAME)
    check_availability(name, names)
    if cfg.VERBOSE:
        print(f"Loading trainer: {name}")
    trainer = TRAINER_REGISTRY.get(name)(cfg)
    return trainer
