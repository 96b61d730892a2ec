"""`JointEncoderTrainer`: transformers' `Trainer` training a joint encoder as a dense retriever.

What it changes in `Trainer` (as little as possible):
- `compute_loss`: encodes queries and passages, `InBatchContrastiveLoss` (in-batch + hard negatives, gathered across
  processes with gradients, false negatives masked by key); the named parts (accuracy, MRR) are logged with the loss.
- `training_step`: only with `grad_cache=True` (GradCache, Gao et al. 2021: memory flat in the batch size).
- `evaluation_loop`: a retrieval evaluator (`evaluator(model) -> {"mrr@10": ...}`, e.g. `RetrievalEvaluator`) instead
  of a loss over an eval set, so `eval_strategy`, `metric_for_best_model` (default: the evaluator's primary metric),
  `load_best_model_at_end` and early stopping work as with any Trainer. With several processes the dev KB is encoded
  once, its shards split across them, and every process gets the same metrics.
- `_load_from_checkpoint` / `_load_best_model`: only for separate towers (saved as two sub-folders).
- `_wrap_model`: several processes train through `data_parallel.GradientAllReduce` (not DDP, whose reducer cannot
  take a query and a passage forward before one backward with batch-dependent unused parameters): one gradient
  all-reduce per optimizer step, exact in every configuration; DeepSpeed / FSDP are refused up front.
- checkpoints: marked complete last (`checkpoints.py`), verified before resume; finished runs are not trained further.
Everything else (optimizer, schedule, checkpoints with RNG and sampler state, logging) is the Trainer's own.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_utils import EvalLoopOutput
from transformers.training_args import ParallelMode
from transformers.utils import logging

from ..bi_encoder import JointEncoderBiEncoder
from ..data.tables import ColumnMapping, PreparedData, prepare_training_data
from ..modeling_joint_encoder import JointEncoderModel
from ..utils.io import write_text
from .arguments import JointEncoderTrainingArguments, check_model_matches_arguments
from .checkpoints import check_launch, mark_complete, resolve_resume_checkpoint, training_lock
from .collator import ContrastiveCollator
from .data_parallel import GradientAllReduce, check_supported
from .freezing import apply_freezing
from .loss import InBatchContrastiveLoss


logger = logging.get_logger(__name__)

LOSS_PARTS = ("accuracy", "mrr")


class _EpochToCollator(TrainerCallback):
    """Tells the collator the epoch, so negatives are re-drawn each epoch and resume draws the same ones."""

    def __init__(self, collator: ContrastiveCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int(math.floor(state.epoch + 1e-6)) if state.epoch else 0


class JointEncoderTrainer(Trainer):
    """
    Args (besides `Trainer`'s):
        model: a `JointEncoderModel` (shared tower) or a `JointEncoderBiEncoder` (separate towers); with
            `args.separate_towers`, a `JointEncoderModel` is turned into two copies of itself.
        train_dataset: queries (anything `data.load_table` accepts, or a `PreparedData`).
        kb: the knowledge base (ignored if `train_dataset` is a `PreparedData`).
        processing_class: the model's tokenizer, or a `JointEncoderProcessor` (needed for image files).
        column_mapping: column names (`ColumnMapping.viquae()` for ViQuAE); default: the generic format.
        on_missing_positive: `"skip"` or `"error"` for queries without a positive.
        feature_store / image_root: where image references point (see `collator.resolve_visual`).
        evaluator: `evaluator(model) -> dict` (or `evaluator(query_model, passage_model)` for separate towers),
            e.g. `RetrievalEvaluator`; used by `evaluate()` and `eval_strategy`.
    """

    def __init__(
        self,
        model: PreTrainedModel | None = None,
        args: JointEncoderTrainingArguments | None = None,
        train_dataset: Any = None,
        kb: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        data_collator: Any = None,
        column_mapping: ColumnMapping | None = None,
        on_missing_positive: str = "skip",
        feature_store: Any = None,
        image_root: str | None = None,
        evaluator: Any = None,
        **kwargs,
    ):
        if args is None:
            args = JointEncoderTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, JointEncoderTrainingArguments):
            raise ValueError(f"args must be JointEncoderTrainingArguments, got {type(args).__name__}")
        if not isinstance(model, (JointEncoderModel, JointEncoderBiEncoder)):
            raise ValueError(
                f"model must be a JointEncoderModel or a JointEncoderBiEncoder, got {type(model).__name__}"
            )
        if args.separate_towers and isinstance(model, JointEncoderModel):
            model = JointEncoderBiEncoder.from_shared(model)
        if args.lora_r is not None:  # PEFT: the encoder inside a PeftModel, only LoRA (+ modules_to_save) trains
            from .lora import wrap_with_lora

            with torch.random.fork_rng(devices=[]):  # the LoRA initialisation depends on the seed only
                torch.manual_seed(args.seed)
                model = wrap_with_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout,
                                       args.lora_target_modules, args.lora_modules_to_save)  # fmt: skip
        check_model_matches_arguments(model, args)
        apply_freezing(model, args.freeze_token_embeddings, args.freeze_first_n_blocks, args.train_only)

        self.prepared_data = None
        if train_dataset is not None and data_collator is None:
            if processing_class is None:
                raise ValueError("pass processing_class (the model's tokenizer or JointEncoderProcessor)")
            if isinstance(train_dataset, PreparedData):
                self.prepared_data = train_dataset
            else:
                if kb is None:
                    raise ValueError("pass kb= (the knowledge base the queries' positive_ids refer to)")
                self.prepared_data = prepare_training_data(train_dataset, kb, column_mapping, on_missing_positive)
            data_collator = ContrastiveCollator(
                self.prepared_data,
                processing_class,
                n_hard_negatives=args.n_hard_negatives,
                query_max_length=args.query_max_length,
                passage_max_length=args.passage_max_length,
                seed=args.data_seed if args.data_seed is not None else args.seed,
                feature_store=feature_store,
                image_root=image_root,
                feat_dim=model.config.feat_dim,
                expected_features=getattr(model.config, "visual_features", None),
                use_query_images=args.use_query_images,
                use_passage_images=args.use_passage_images,
            )
            train_dataset = self.prepared_data.queries
            global_batch = args.per_device_train_batch_size * args.world_size
            even_batches = getattr(args.accelerator_config, "even_batches", True)
            if (
                args.world_size > 1
                and len(train_dataset) % global_batch
                and even_batches
                and not args.dataloader_drop_last
            ):
                logger.warning(
                    f"{len(train_dataset)} training queries are not a multiple of the global batch {global_batch}: "
                    f"accelerate pads the last batch of each epoch with queries repeated from the epoch's start "
                    f"(even_batches), so those count twice; set dataloader_drop_last, or a batch size that divides "
                    f"the queries (see docs/multi_process_training.md)"
                )
            if len(train_dataset) < global_batch:
                raise ValueError(
                    f"{len(train_dataset)} training queries but one global batch takes {global_batch} "
                    f"({args.world_size} process(es) x per_device_train_batch_size {args.per_device_train_batch_size}): "
                    f"lower the batch size or the number of processes"
                )
        self.evaluator = evaluator
        if evaluator is not None:
            if eval_dataset is None:
                # Trainer wants an eval set for eval_strategy; evaluation_loop reads the evaluator instead
                eval_dataset = ["retrieval evaluator"]
            if getattr(args, "metric_from_evaluator", False) and args.load_best_model_at_end:
                args.metric_for_best_model = getattr(evaluator, "primary_metric", "mrr@10")
                args.greater_is_better = getattr(evaluator, "greater_is_better", True)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            data_collator=data_collator,
            **kwargs,
        )
        check_supported(self)
        check_launch(args)
        # The loss is a per-step mean over the (global) batch: the Trainer divides it for gradient accumulation.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.loss_fn = InBatchContrastiveLoss.from_config(
            self.model.config, gather_across_processes=args.gather_across_processes
        )
        if isinstance(data_collator, ContrastiveCollator):
            self.add_callback(_EpochToCollator(data_collator))
        self._loss_parts: dict[str, list[torch.Tensor]] = {name: [] for name in LOSS_PARTS}

    # ------------------------------------------------------------------------------------------ data parallel
    def _wrap_model(self, model, training: bool = True, dataloader=None):
        """Several processes: `GradientAllReduce` (exact for every configuration, see data_parallel.py) instead of
        accelerate's DDP; the Trainer then prepares only the optimizer."""
        if isinstance(model, GradientAllReduce):
            return model
        if not training or self.args.world_size <= 1 or self.args.parallel_mode != ParallelMode.DISTRIBUTED:
            return super()._wrap_model(model, training, dataloader)
        for name in ("ddp_find_unused_parameters", "ddp_static_graph", "ddp_bucket_cap_mb"):
            if getattr(self.args, name, None) is not None:
                logger.info(f"{name} does not apply: JointEncoderTrainer all-reduces gradients once per step itself")
        return GradientAllReduce(self.model, autocast=self.accelerator.autocast)

    def _all_reduce_if_last_micro_batch(self, model) -> None:
        if isinstance(model, GradientAllReduce) and self.accelerator.sync_gradients:
            model.all_reduce_gradients()

    # ------------------------------------------------------------------------------------------------- loss
    def _embed(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self._encoder(model), JointEncoderBiEncoder):
            out = model(query=inputs["query"], passage=inputs["passage"])  # one (DDP) forward for both towers
            return out.query_embeddings, out.passage_embeddings
        queries = model(**inputs["query"], return_dict=True).pooler_output  # (Q, D)
        passages = model(**inputs["passage"], return_dict=True).pooler_output  # (P, D)
        return queries, passages

    def _encoder(self, model) -> torch.nn.Module:
        """The JointEncoderModel / JointEncoderBiEncoder inside `model` (DDP, accelerate or GradientAllReduce)."""
        model = model.module if isinstance(model, GradientAllReduce) else model
        return self.accelerator.unwrap_model(model)

    def _record_parts(self, parts: dict[str, torch.Tensor]) -> None:
        if self.model.training:
            for name in LOSS_PARTS:
                if name in parts:
                    self._loss_parts[name].append(parts[name].detach())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        queries, passages = self._embed(model, inputs)
        parts = self.loss_fn(
            queries,
            passages,
            inputs["positive_index"],
            inputs.get("passage_keys"),
            inputs.get("query_positive_keys"),
        )
        self._record_parts(parts)
        if return_outputs:
            return parts["loss"], {"query_embeddings": queries, "passage_embeddings": passages, **parts}
        return parts["loss"]

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.args.grad_cache:
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._all_reduce_if_last_micro_batch(model)
            return loss
        from .grad_cache import default_embed, grad_cache_step

        model.train()
        inputs = self._prepare_inputs(inputs)
        bi_encoder = isinstance(self._encoder(model), JointEncoderBiEncoder)
        # GradientAllReduce reduces once after all chunks; DDP (a single-process wrapper never is) syncs in-chunk
        no_sync = (
            (lambda module: contextlib.nullcontext())
            if isinstance(model, GradientAllReduce)
            else self.accelerator.no_sync
        )

        def embed(module, chunk):
            if not bi_encoder:
                return default_embed(module, chunk)
            chunk = dict(chunk)
            tower = chunk.pop("_tower")
            out = module(**{tower: chunk})
            return out.query_embeddings if tower == "query" else out.passage_embeddings

        query_inputs, passage_inputs = dict(inputs["query"]), dict(inputs["passage"])
        if bi_encoder:
            query_inputs["_tower"], passage_inputs["_tower"] = "query", "passage"
        with self.compute_loss_context_manager():
            parts = grad_cache_step(
                model,
                model,
                query_inputs,
                passage_inputs,
                self.loss_fn,
                {
                    "positive_index": inputs["positive_index"],
                    "passage_keys": inputs.get("passage_keys"),
                    "query_positive_keys": inputs.get("query_positive_keys"),
                },
                chunk_size=self.args.grad_cache_chunk_size,
                backward_fn=self.accelerator.backward,
                loss_scale=1.0 / self.current_gradient_accumulation_steps,
                no_sync=no_sync,
                embed_fn=embed,
            )
        self._all_reduce_if_last_micro_batch(model)
        self._record_parts(parts)
        return parts["loss"].detach() / self.current_gradient_accumulation_steps

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean in-batch accuracy / MRR since the last log to the training logs."""
        if "loss" in logs:
            for name, values in self._loss_parts.items():
                if values:
                    logs[f"in_batch_{name}"] = round(torch.stack(values).float().mean().item(), 4)
                    values.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> EvalLoopOutput:
        """Retrieval metrics from `self.evaluator` (e.g. MRR@10 over the evaluation queries and KB), named
        `{metric_key_prefix}_{metric}`; `Trainer.evaluate` logs them, calls the callbacks and tracks the best one."""
        if self.evaluator is None:
            raise ValueError(
                "evaluate() needs a retrieval evaluator: JointEncoderTrainer(..., evaluator=RetrievalEvaluator(...))"
            )
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        # several processes: the evaluator splits the work and returns the same metrics everywhere
        kwargs = {"state": self.accelerator.state} if self.args.world_size > 1 else {}
        with torch.no_grad():
            if isinstance(model, JointEncoderBiEncoder):
                metrics = self.evaluator(model.query_encoder, model.passage_encoder, **kwargs)
            else:
                metrics = self.evaluator(model, **kwargs)
        model.train(was_training)
        metrics = {
            (key if key.startswith(f"{metric_key_prefix}_") else f"{metric_key_prefix}_{key}"): float(value)
            for key, value in metrics.items()
        }
        n_queries = len(self.evaluator) if hasattr(self.evaluator, "__len__") else 0
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=n_queries)

    # -------------------------------------------------------------------------------- checkpoints and resume
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint="last"` (or True) is the newest COMPLETE checkpoint of
        `output_dir`, and a named checkpoint is verified first (see checkpoints.py). The output folder is locked
        against a second training for the duration."""
        resume = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        with training_lock(self.args.output_dir, enabled=self.args.should_save):
            return super().train(
                resume_from_checkpoint=resume, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
            )

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ):
        result = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        if resume_from_checkpoint is not None and self.state.global_step >= max_steps:
            raise ValueError(
                f"checkpoint {resume_from_checkpoint!r} is at step {self.state.global_step} and this run has "
                f"{max_steps} steps: that run is finished, nothing to resume (its final model is in "
                f"{self.args.output_dir!r}). To train further, raise max_steps (or num_train_epochs) above "
                f"{self.state.global_step}, or drop --resume_from_checkpoint to start a new run in another output_dir"
            )
        return result

    def _save_checkpoint(self, model, trial) -> None:
        """`Trainer._save_checkpoint`, made safe to kill: an existing folder of that step is removed first, the
        completeness marker is written last (after every process wrote its files), old checkpoints are rotated
        only after that."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save and os.path.isdir(folder):
            import shutil

            shutil.rmtree(folder)
        self.accelerator.wait_for_everyone()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotation waits for the marker: never delete the last complete one first
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            mark_complete(folder, self.state.global_step)
            rotate_checkpoints(
                output_dir=os.path.dirname(folder),
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    # ------------------------------------------------------------------------------ separate towers: resume
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = model if model is not None else self.model
        if isinstance(self._encoder(target), JointEncoderBiEncoder):
            self._encoder(target).load_towers_(resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if isinstance(self.accelerator.unwrap_model(self.model), JointEncoderBiEncoder):
            self.accelerator.unwrap_model(self.model).load_towers_(self.state.best_model_checkpoint)
            return
        super()._load_best_model()

    # ------------------------------------------------------------------------------------------- model card
    def save_final_model(
        self,
        output_dir: str | None = None,
        results: dict | None = None,
        data_description: str = "",
        base_model: str | None = None,
        final_dir: str | None = None,
    ) -> str:
        """`save_model` (weights + remote code + tokenizer/processor) and a README.md model card. `final_dir`: where
        the folder will be used from if `output_dir` is a staging folder renamed afterwards (the card's title and
        usage snippet)."""
        output_dir = output_dir or self.args.output_dir
        self.save_model(output_dir)
        if self.args.should_save:
            from ..bi_encoder import TOWERS
            from .model_card import write_trained_model_card

            if self.processing_class is not None and isinstance(
                self.accelerator.unwrap_model(self.model), JointEncoderBiEncoder
            ):
                for tower in TOWERS:  # each tower folder loads on its own, tokenizer / processor included
                    self.processing_class.save_pretrained(os.path.join(output_dir, tower))

            # The released folder carries the arguments as JSON, not as Trainer's pickled training_args.bin: nobody
            # should have to unpickle a file from a model repo to learn how it was trained.
            pickled = os.path.join(output_dir, "training_args.bin")
            if os.path.exists(pickled):
                os.remove(pickled)
            write_text(os.path.join(output_dir, "training_args.json"), self.args.to_json_string())
            write_trained_model_card(self, output_dir, results or {}, data_description, base_model, final_dir)
        return output_dir


__all__ = ["JointEncoderTrainer"]
