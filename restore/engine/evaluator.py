"""Classification evaluator (Dassl's printed block) and ``compute_accuracy``; no sklearn needed."""

from __future__ import annotations

import csv
import io
import os.path as osp
from collections import OrderedDict, defaultdict
from typing import Any, Sequence

import numpy as np
import torch

from restore.log import get_logger
from .registry import EVALUATOR_REGISTRY, check_availability
from .utils import atomic_write_bytes

logger = get_logger(__name__)


def compute_accuracy(output: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor,
                     topk: tuple[int, ...] = (1,)) -> list[torch.Tensor]:
    """Top-k accuracies in percent, each a 1-element tensor (Dassl semantics)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    maxk = max(topk)
    batch_size = target.size(0)
    _, pred = output.topk(maxk, 1, True, True)
    correct = pred.t().eq(target.view(1, -1).expand_as(pred.t()))
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / batch_size) for k in topk]


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro F1 over the labels present in ``y_true`` (sklearn's ``labels=unique(y_true)``), in [0, 1]."""
    scores = []
    for label in np.unique(y_true):
        tp = np.sum((y_pred == label) & (y_true == label))
        fp = np.sum((y_pred == label) & (y_true != label))
        fn = np.sum((y_pred != label) & (y_true == label))
        denom = 2 * tp + fp + fn
        scores.append(0.0 if denom == 0 else 2 * tp / denom)
    return float(np.mean(scores)) if scores else 0.0


class EvaluatorBase:
    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def reset(self) -> None:
        raise NotImplementedError

    def process(self, mo: torch.Tensor, gt: torch.Tensor) -> None:
        raise NotImplementedError

    def evaluate(self) -> "OrderedDict[str, float]":
        raise NotImplementedError


@EVALUATOR_REGISTRY.register()
class Classification(EvaluatorBase):
    """Accuracy, error rate, macro-F1 and optional per-class accuracy, printed as Dassl does."""

    def __init__(self, cfg: Any, lab2cname: dict[int, str] | None = None, **kwargs: Any) -> None:
        super().__init__(cfg)
        self._lab2cname = lab2cname
        self._per_class_res: dict[int, list[bool]] | None = None
        self.reset()

    def reset(self) -> None:
        self._correct = 0
        self._total = 0
        self._y_true: list[int] = []
        self._y_pred: list[int] = []
        if self.cfg.TEST.PER_CLASS_RESULT:
            if self._lab2cname is None:
                raise ValueError("TEST.PER_CLASS_RESULT needs lab2cname")
            self._per_class_res = defaultdict(list)

    def process(self, mo: torch.Tensor, gt: torch.Tensor) -> None:
        pred = mo.max(1)[1]
        matches = pred.eq(gt).int()
        self._correct += int(matches.sum().item())
        self._total += gt.shape[0]
        self._y_true.extend(gt.cpu().tolist())
        self._y_pred.extend(pred.cpu().tolist())
        if self._per_class_res is not None:
            for label, match in zip(gt.cpu().tolist(), matches.cpu().tolist()):
                self._per_class_res[label].append(bool(match))

    def evaluate(self) -> "OrderedDict[str, float]":
        results: "OrderedDict[str, float]" = OrderedDict()
        if self._total == 0:
            raise RuntimeError("The evaluation set is empty: nothing was evaluated. Check the dataset split.")
        acc = 100.0 * self._correct / self._total
        err = 100.0 - acc
        y_true, y_pred = np.asarray(self._y_true), np.asarray(self._y_pred)
        f1 = 100.0 * macro_f1(y_true, y_pred)
        results["accuracy"] = acc
        results["error_rate"] = err
        results["macro_f1"] = f1
        logger.info("=> result\n"
              f"* total: {self._total:,}\n"
              f"* correct: {self._correct:,}\n"
              f"* accuracy: {acc:.1f}%\n"
              f"* error: {err:.1f}%\n"
              f"* macro_f1: {f1:.1f}%")
        if self._per_class_res is not None:
            accs = []
            logger.info("=> per-class result")
            for label in sorted(self._per_class_res):
                res = self._per_class_res[label]
                correct, total = sum(res), len(res)
                a = 100.0 * correct / total
                accs.append(a)
                logger.info(f"* class: {label} ({self._lab2cname[label]})\ttotal: {total:,}\tcorrect: {correct:,}\tacc: {a:.1f}%")
            results["perclass_accuracy"] = float(np.mean(accs))
            logger.info(f"* average: {results['perclass_accuracy']:.1f}%")
        if self.cfg.TEST.COMPUTE_CMAT:
            labels = np.unique(np.concatenate([y_true, y_pred]))
            index = {l: i for i, l in enumerate(labels)}
            cmat = np.zeros((len(labels), len(labels)))
            for t, p in zip(y_true, y_pred):
                cmat[index[t], index[p]] += 1
            cmat = cmat / np.maximum(cmat.sum(1, keepdims=True), 1)
            save_path = osp.join(self.cfg.OUTPUT_DIR, "cmat.pt")
            torch.save(torch.from_numpy(cmat), save_path)
            logger.info(f"Confusion matrix is saved to {save_path}")
        return results


SELECTION_METRICS = ("accuracy", "worst_group_accuracy", "group_mean_accuracy", "weighted_accuracy")


@EVALUATOR_REGISTRY.register()
class GroupClassification(Classification):
    """Classification plus group robustness: accuracy per (class, spurious attribute) group.

    The spurious attribute of an image is its Datum ``domain``. The test loop hands each batch to
    :meth:`observe_batch` before :meth:`process` (Dassl's ``process(mo, gt)`` signature is kept);
    :meth:`bind_dataset` takes the attribute names and the train split's group counts from the
    dataset. ``evaluate`` prints Dassl's block, then the per-group table, and adds
    ``worst_group_accuracy``, ``group_mean_accuracy`` and ``weighted_accuracy`` to the results.
    ``TEST.SELECTION_METRIC`` chooses which of them picks the best-val model.
    """

    def __init__(self, cfg: Any, lab2cname: dict[int, str] | None = None, **kwargs: Any) -> None:
        node = cfg.DATASET.GROUPS
        # tuples: DDP's evaluate() concatenates an evaluator's lists over ranks, these are per-dataset constants
        self._attribute_names: tuple[str, ...] = tuple(node.ATTRIBUTE_NAMES) or ("attribute 0", "attribute 1")
        self._train_counts: tuple[int, ...] | None = None
        self._pending: tuple[list[int], list[str]] | None = None
        self.last_metrics: Any = None
        metric = str(cfg.TEST.SELECTION_METRIC)
        if metric not in SELECTION_METRICS:
            raise ValueError(f"TEST.SELECTION_METRIC {metric!r} is not one of {', '.join(SELECTION_METRICS)}.")
        self.selection_metric = metric
        super().__init__(cfg, lab2cname, **kwargs)

    def reset(self) -> None:
        super().reset()
        self._attrs: list[int] = []
        self._impaths: list[str] = []
        self._pending = None

    def bind_dataset(self, dataset: Any) -> None:
        """Attribute names and train group counts of a group dataset (``attribute_names``, ``train_group_counts``)."""
        names = getattr(dataset, "attribute_names", None)
        if names:
            self._attribute_names = tuple(names)
        counts = getattr(dataset, "train_group_counts", None)
        self._train_counts = tuple(counts) if counts else None

    def observe_batch(self, batch: dict[str, Any]) -> None:
        """Remember the spurious attributes (``domain``) and paths of the batch ``process`` gets next."""
        domain = batch["domain"]
        attrs = domain.tolist() if hasattr(domain, "tolist") else list(domain)
        self._pending = ([int(a) for a in attrs], [str(p) for p in batch.get("impath", [""] * len(attrs))])

    def process(self, mo: torch.Tensor, gt: torch.Tensor) -> None:
        if self._pending is None or len(self._pending[0]) != gt.shape[0]:
            raise RuntimeError("GroupClassification needs each image's spurious attribute: the test loop must call "
                               "evaluator.observe_batch(batch) before evaluator.process(output, label).")
        super().process(mo, gt)
        self._attrs.extend(self._pending[0])
        self._impaths.extend(self._pending[1])
        self._pending = None

    def evaluate(self) -> "OrderedDict[str, float]":
        from restore.evaluation.groups import format_group_table, group_metrics, group_names

        results = super().evaluate()
        num_classes = (max(self._lab2cname) + 1) if self._lab2cname else (max(self._y_true) + 1)
        classnames = [(self._lab2cname or {}).get(i, str(i)) for i in range(num_classes)]
        names = group_names(classnames, self._attribute_names)
        counts = self._train_counts if self._train_counts and len(self._train_counts) == len(names) else None
        m = group_metrics(self._y_true, self._y_pred, self._attrs, names, len(self._attribute_names), counts)
        self.last_metrics = m
        print(format_group_table(m))
        results["worst_group_accuracy"] = m.worst_group_accuracy
        results["group_mean_accuracy"] = m.group_mean_accuracy
        if m.weighted_accuracy is not None:
            results["weighted_accuracy"] = m.weighted_accuracy
        return results

    def results_details(self, output_dir: str) -> dict[str, Any]:
        """Write ``predictions.csv`` (one row per test image) and return the ``groups`` record for results.json."""
        if self.last_metrics is None:
            return {}
        num_attrs = len(self._attribute_names)
        rows: list[list[Any]] = [["impath", "label", "attribute", "group", "prediction", "correct"]]
        for path, y, a, p in zip(self._impaths, self._y_true, self._attrs, self._y_pred):
            rows.append([path, y, a, y * num_attrs + a, p, int(y == p)])
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        atomic_write_bytes(buf.getvalue().encode(), osp.join(output_dir, "predictions.csv"))
        return {"groups": self.last_metrics.as_record(), "attribute_names": list(self._attribute_names),
                "predictions_file": "predictions.csv"}


def build_evaluator(cfg: Any, **kwargs: Any) -> EvaluatorBase:
    """Instantiate ``cfg.TEST.EVALUATOR`` from the registry."""
    names = EVALUATOR_REGISTRY.registered_names()
    check_availability(cfg.TEST.EVALUATOR, names)
    if cfg.VERBOSE:
        logger.info(f"Loading evaluator: {cfg.TEST.EVALUATOR}")
    return EVALUATOR_REGISTRY.get(cfg.TEST.EVALUATOR)(cfg, **kwargs)
