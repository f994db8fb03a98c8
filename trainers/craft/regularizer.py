"""Craft as a plug-in regularizer of every :class:`~restore.prompting.trainer.PromptTrainer`.

Switched on by ``TRAINER.CRAFT.ENABLED True`` on any host trainer (CoOp, CoCoOp, KgCoOp, IVLP,
VPT, MaPLe, PromptSRC, MMRL, RESTORE, ...); the host needs no change. Per training step, with
``F`` the batch image features, ``W`` the prompted class text features (static text anchors),
``A`` the static image anchors, ``S`` the stochastic text anchors of the batch and ``s`` the logit
scale (every loss computed in float32 with autocast off, :mod:`trainers.craft.losses`):

* ``WEIGHT_STATIC      * CE(s S A^T, y)``                       L_Aligned(Static), text -> image anchors
* ``WEIGHT_STOCHASTIC  * CE(s F S^T, targets)``                 L_Aligned(Stochastic), image -> text
* ``WEIGHT_STOCHASTIC_T2I * CE(s S F^T, targets)``              optional reverse direction
* ``MMD_WEIGHT * MMD(s F W^T, s F_t W^T)``                      L_MMD on anchor-aligned features, with
  ``F_t`` the features of an unlabelled target-domain batch drawn in step from the regularizer's own
  infinite loader over ``TARGET_DATASET``.

Stochastic text anchors ``S`` ("template" mode, the official code) are the dataset's hand-written
template filled with each sample's class name and encoded by the text tower with the host's deep
text prompts. The host's deep text prompts are found as, in this order: a model method
``encode_sentences(token_ids) -> (N, D)``; the model's own ``text_deep()`` (every
``DeepPromptModel``: IVLP, VPT, MaPLe, PromptSRC, RESTORE), followed by its
``adapt_text_features`` when it has one; the first learnable sub-module with a ``text_deep()``
method (:mod:`restore.prompting.deep`). "class" mode uses ``W[y]`` instead (works for hosts whose
only text prompt is the layer-0 context, e.g. CoOp); on image-conditional hosts (CoCoOp, whose text
features are per image, ``extras["text_features_per_image"]`` (B, C, D)) sample ``b``'s anchor is its
class's text feature conditioned on its own image, ``W(x_b)[y_b]``, and the MMD uses the host's
logits (the relative representation of each image w.r.t. its own conditioned class texts).

Static anchors and the target loader are prepared on the first training step (an ``--eval-only``
run computes nothing); the global RNG states are left unchanged by that preparation.

Under DDP (``torchrun``; :mod:`restore.engine.distributed`) the target loader is sharded like the
training loader (each rank loads its contiguous slice of the same global target batch, which is
the single-process batch), and the batch-level terms are computed on the global batch: the
stochastic term is a contrastive loss over the batch and the MMD (with its per-column min-max
scaling) is not a mean over samples, so averaging per-rank values or gradients would differ from
one process. Their inputs are all-gathered with gradients (:func:`all_gather_rows`), every rank
computes the same global loss, and the rank-averaged gradient is the single-process gradient. The
static term is a mean over samples and stays per rank.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F

from restore.engine.distributed import all_gather_rows
from restore.prompting.trainer import PromptOutput, register_regularizer

from .config import check, craft_node, is_enabled
from .losses import mmd, relative_logits, static_alignment_loss, stochastic_alignment_loss

__all__ = ["CraftRegularizer", "build_craft_regularizer", "find_text_deep_module"]


def find_text_deep_module(model: torch.nn.Module) -> tuple[str, Any] | None:
    """(name, owner) of the host's deep text prompts: the model itself when it has ``text_deep()``
    (:class:`trainers.ivlp.DeepPromptModel` and its subclasses), else the first learnable
    sub-module with one (a :mod:`restore.prompting.deep` module); None when there is none."""
    if callable(getattr(model, "text_deep", None)):
        return type(model).__name__, model
    is_frozen = getattr(model, "is_frozen_name", lambda name: False)
    for name, module in model.named_modules():
        if name and not is_frozen(name + ".") and callable(getattr(module, "text_deep", None)):
            return name, module
    return None


class CraftRegularizer:
    """Callable ``(trainer, image, label, output) -> (loss, summary)`` added to the host's loss."""

    def __init__(self, cfg: Any, trainer: Any) -> None:
        node = craft_node(cfg)
        check(node)
        self.cfg, self.node = cfg, node
        self.device = trainer.device
        self.classnames = list(trainer.dm.dataset.classnames)
        self.w_static = float(node.WEIGHT_STATIC)
        self.w_stochastic = float(node.WEIGHT_STOCHASTIC)
        self.w_t2i = float(node.WEIGHT_STOCHASTIC_T2I)
        self.w_mmd = float(node.MMD_WEIGHT)
        self.temperature = float(node.TEMPERATURE)
        self.contrast_targets = str(node.CONTRAST_TARGETS)
        self.clusters = int(node.ANCHOR_CLUSTERS)
        self.bandwidths = [float(b) for b in node.MMD_BANDWIDTHS]
        self.minmax = bool(node.MMD_MINMAX)
        self.anchors: torch.Tensor | None = None  # (C*K, D), L2-normalised, on the trainer's device
        self._target_loader: Any = None
        self._target_iter: Iterator[Any] | None = None
        self._target_pass_state: torch.Tensor | None = None  # loader generator state when this pass began
        self._target_drawn = 0  # batches drawn in this pass
        self._resume_state: dict[str, Any] | None = None
        self._sentence_ids: torch.Tensor | None = None
        self.text_mode, self._deep_source = self._resolve_text_mode(trainer.model)
        weights = (f"static {self.w_static:g}, stochastic {self.w_stochastic:g}"
                   + (f", stochastic t2i {self.w_t2i:g}" if self.w_t2i else "") + f", mmd {self.w_mmd:g}")
        source = ""
        if self.needs_text:
            source = f"; stochastic text anchors: {self.text_mode}"
            if self.text_mode == "template":
                source += f" ({self._deep_source_name}, template {self.template!r})"
        print(f"Craft regularizer on {type(trainer).__name__}: {weights}{source}", flush=True)

    # --- set-up ---
    @property
    def needs_text(self) -> bool:
        return self.w_static > 0 or self.w_stochastic > 0 or self.w_t2i > 0

    @property
    def template(self) -> str:
        from restore.datasets.templates import dataset_template

        return str(self.node.TEMPLATE) or dataset_template(str(self.cfg.DATASET.NAME))

    def _resolve_text_mode(self, model: torch.nn.Module) -> tuple[str, Any]:
        mode = str(self.node.STOCHASTIC_TEXT)
        hook = getattr(model, "encode_sentences", None)
        found = None if callable(hook) else find_text_deep_module(model)
        if callable(hook):
            self._deep_source_name = f"{type(model).__name__}.encode_sentences"
            source: Any = hook
        elif found is not None:
            self._deep_source_name = f"deep text prompts of '{found[0]}'"
            source = found[1]
        else:
            self._deep_source_name = "no deep text prompts: frozen text tower"
            source = None
        if mode == "auto":
            has_prompts = callable(hook) or (found is not None and len(found[1].text_deep()) > 0)
            mode = "template" if has_prompts else "class"
        return mode, source

    def prepare(self, trainer: Any) -> None:
        """Load or compute the static image anchors and build the target loader (once); continue a
        resumed target stream."""
        if self.w_static > 0 and self.anchors is None:
            from .anchors import ensure_anchors

            data = ensure_anchors(self.cfg, trainer.model.clip, self.classnames, self.device,
                                  getattr(trainer, "autocast_dtype", None))
            self.anchors = F.normalize(data["anchors"].float(), dim=-1).to(self.device)
        if self.w_mmd > 0 and self._target_loader is None:
            self._target_loader = self.build_target_loader()
        if self._resume_state is not None and self._target_loader is not None:
            self._resume_target_stream(self._resume_state)
            self._resume_state = None

    # --- resume: the target stream continues where the checkpoint left it ---
    def state_dict(self) -> dict[str, Any]:
        """Where the target stream stands: the loader generator's state when the current pass began
        and the batches drawn since (saved in checkpoints with the engine's RNG states)."""
        if self._target_iter is None or self._target_pass_state is None:
            return {}
        return {"target_pass_state": self._target_pass_state.clone(), "target_drawn": self._target_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the target stream of :meth:`state_dict` (applied by the next :meth:`prepare`)."""
        self._resume_state = dict(state) if state else None

    def _resume_target_stream(self, state: dict[str, Any]) -> None:
        generator = getattr(self._target_loader, "generator", None)
        if generator is None:  # unseeded run (SEED < 0): the order was random anyway
            return
        generator.set_state(state["target_pass_state"])
        self._start_target_pass()
        for _ in range(int(state["target_drawn"])):  # replay the drawn part of the pass (same order)
            next(self._target_iter)  # type: ignore[arg-type]
        self._target_drawn = int(state["target_drawn"])

    def _start_target_pass(self) -> None:
        generator = getattr(self._target_loader, "generator", None)
        self._target_pass_state = generator.get_state() if generator is not None else None
        self._target_iter = iter(self._target_loader)
        self._target_drawn = 0

    def build_target_loader(self) -> Any:
        """A shuffled loader over TARGET_NUM_SHOTS unlabelled images per class of TARGET_DATASET.

        Its order comes from a generator seeded with the target seed; under DDP ``build_data_loader``
        wraps the sampler in a :class:`~restore.engine.distributed.ShardedSampler` (rank 0's order,
        shared), so the global target batches are the single-process ones and each rank loads
        ``TARGET_BATCH_SIZE / world_size`` of them (the batch size is global, like the training one).
        """
        from restore.engine.data import build_data_loader, build_dataset, build_transform

        from .anchors import preserved_rng, sample_per_class

        node, cfg = self.node, self.cfg
        seed = int(node.TARGET_SEED) if int(node.TARGET_SEED) >= 0 else (int(cfg.SEED) if int(cfg.SEED) >= 0 else 1)
        tcfg = cfg.clone()
        tcfg.defrost()
        tcfg.DATASET.NAME = str(node.TARGET_DATASET)
        tcfg.DATASET.ROOT = str(node.TARGET_ROOT) or cfg.DATASET.ROOT
        tcfg.DATASET.NUM_SHOTS = -1
        tcfg.DATASET.SUBSAMPLE_CLASSES = "all"
        tcfg.SEED = seed
        tcfg.freeze()
        batch_size = int(node.TARGET_BATCH_SIZE) or int(cfg.DATALOADER.TRAIN_X.BATCH_SIZE)
        with preserved_rng():
            print(f"Craft: unlabelled target domain {tcfg.DATASET.NAME} for the MMD term", flush=True)
            dataset = build_dataset(tcfg)
            items = sample_per_class(dataset.train_x, int(node.TARGET_NUM_SHOTS), seed)
            tfm = build_transform(tcfg, is_train=node.TARGET_TRANSFORM == "train")
            try:
                generator = torch.Generator()  # its own stream: the training batches stay Dassl's
                generator.manual_seed(seed)
                loader = build_data_loader(tcfg, sampler_type="RandomSampler", data_source=items,
                                           batch_size=batch_size, tfm=tfm, is_train=True, generator=generator)
            except ValueError as err:  # DDP: the global target batch must split evenly over the ranks
                raise ValueError(f"Craft's target loader (global batch {batch_size} from TRAINER.CRAFT."
                                 f"TARGET_BATCH_SIZE, {len(items)} target images): {err}") from None
        print(f"Craft: {len(items):,} unlabelled target images, batch {batch_size}, "
              f"{node.TARGET_TRANSFORM} transform", flush=True)
        return loader

    def next_target_batch(self) -> torch.Tensor:
        """The next unlabelled target images (the loader restarts when exhausted, as TrainerXU's)."""
        if self._target_iter is None:
            self._start_target_pass()
        try:
            batch = next(self._target_iter)  # type: ignore[arg-type]
        except StopIteration:
            self._start_target_pass()
            batch = next(self._target_iter)  # type: ignore[arg-type]
        self._target_drawn += 1
        return batch["img"].to(self.device)

    # --- per step ---
    def scale(self, model: Any) -> torch.Tensor | float:
        if self.temperature > 0:
            return 1.0 / self.temperature
        return model.logit_scale.float()

    def encode_sentences(self, model: Any, label: torch.Tensor) -> torch.Tensor:
        """Stochastic text anchors in "template" mode: (B, D), one per sample (unique labels encoded once)."""
        if self._sentence_ids is None:
            from restore.clip.tokenizer import tokenize
            from restore.prompting.context import clean_classname

            prompts = [self.template.format(clean_classname(c)) for c in self.classnames]
            self._sentence_ids = tokenize(prompts).to(self.device)
        uniq, inverse = torch.unique(label, return_inverse=True)
        ids = self._sentence_ids[uniq]
        source = self._deep_source
        if source is None:
            feats = model.text_encoder.encode_token_ids(ids).features
        elif callable(getattr(source, "text_deep", None)):
            feats = model.text_encoder.encode_token_ids(ids, source.text_deep()).features
            adapt = getattr(model, "adapt_text_features", None)  # e.g. surgery adapters of RESTORE
            feats = adapt(feats) if callable(adapt) else feats
        else:
            feats = source(ids)
        return feats.float()[inverse]

    def stochastic_text(self, model: Any, label: torch.Tensor, output: PromptOutput) -> torch.Tensor:
        """Stochastic text anchors (B, D): "template" mode, or the prompted text feature of each sample's
        class, ``W[y_b]``; for image-conditional hosts (CoCoOp: per-image text features (B, C, D) in
        ``extras["text_features_per_image"]``) the one conditioned on the sample's own image, ``W(x_b)[y_b]``."""
        if self.text_mode == "template":
            return self.encode_sentences(model, label)
        if output.text_features is not None:
            return output.text_features.float()[label]
        per_image = output.extras.get("text_features_per_image")
        if per_image is not None:
            return per_image.float()[torch.arange(label.shape[0], device=label.device), label]
        raise ValueError(f"Craft with STOCHASTIC_TEXT 'class' needs the host's class text features: "
                         f"{type(model).__name__}'s PromptOutput has neither text_features (C, D) nor "
                         "extras['text_features_per_image'] (B, C, D); use STOCHASTIC_TEXT 'template'")

    def __call__(self, trainer: Any, image: torch.Tensor, label: torch.Tensor,
                 output: PromptOutput) -> tuple[torch.Tensor, dict[str, float]]:
        self.prepare(trainer)
        model = trainer.model
        scale = self.scale(model)
        total = output.logits.new_zeros((), dtype=torch.float32)
        summary: dict[str, float] = {}
        if self.needs_text:
            text = self.stochastic_text(model, label, output)
            if self.w_static > 0:
                loss = static_alignment_loss(text, self.anchors, label, scale, self.clusters)
                total = total + self.w_static * loss
                summary["craft_static"] = loss.item()
            if self.w_stochastic > 0 or self.w_t2i > 0:
                feats = output.image_features
                if feats is None:
                    raise ValueError("Craft's stochastic alignment needs the host's PromptOutput.image_features")
                # DDP: a contrastive loss over the global batch (identity when single-process)
                feats, keys, labels = all_gather_rows(feats), all_gather_rows(text), all_gather_rows(label)
                if self.w_stochastic > 0:
                    loss = stochastic_alignment_loss(feats, keys, labels, scale, self.contrast_targets)
                    total = total + self.w_stochastic * loss
                    summary["craft_stoch"] = loss.item()
                if self.w_t2i > 0:
                    loss = stochastic_alignment_loss(keys, feats, labels, scale, self.contrast_targets)
                    total = total + self.w_t2i * loss
                    summary["craft_t2i"] = loss.item()
        if self.w_mmd > 0:
            target = self.next_target_batch()
            if output.image_features is not None and output.text_features is not None:
                source_z = relative_logits(output.image_features, output.text_features, scale)
                target_z = relative_logits(model.encode_image(target), output.text_features, scale)
            else:  # hosts without features: their logits are the relative representation
                source_z, target_z = output.logits.float(), model(target).logits.float()
            # DDP: the MMD of the global source and target batches (identity when single-process)
            loss = mmd(all_gather_rows(source_z), all_gather_rows(target_z), self.bandwidths, self.minmax)
            total = total + self.w_mmd * loss
            summary["craft_mmd"] = loss.item()
        return total, summary


@register_regularizer
def build_craft_regularizer(cfg: Any, trainer: Any) -> CraftRegularizer | None:
    """The factory consulted by every PromptTrainer: a CraftRegularizer when TRAINER.CRAFT.ENABLED."""
    if not is_enabled(cfg):
        return None
    return CraftRegularizer(cfg, trainer)
