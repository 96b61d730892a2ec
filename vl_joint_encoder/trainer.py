"""`JointEncoderTrainer`: transformers' `Trainer` training a joint encoder as a dense retriever.

What it changes in `Trainer` (as little as possible):
- `compute_loss`: encodes queries and passages, `InBatchContrastiveLoss` (in-batch + hard negatives, gathered across
  processes with gradients, false negatives masked by key); the named parts (accuracy, MRR) are logged with the loss.
- `training_step`: only with `grad_cache=True` (GradCache, Gao et al. 2021: memory flat in the batch size).
- `evaluate`: through a retrieval evaluator (`evaluator(model) -> {"mrr@10": ...}`), so `eval_strategy` works.
- `_load_from_checkpoint` / `_load_best_model`: only for separate towers (saved as two sub-folders).
Everything else (optimizer, schedule, DDP / FSDP / DeepSpeed through accelerate, checkpoints with RNG and sampler
state, logging) is the Trainer's own.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from .bi_encoder import JointEncoderBiEncoder
from .collator import ContrastiveCollator
from .data import ColumnMapping, PreparedData, prepare_training_data
from .freezing import TRAIN_ONLY_CHOICES, apply_freezing
from .loss import InBatchContrastiveLoss
from .modeling_joint_encoder import JointEncoderModel


logger = logging.get_logger(__name__)

LOSS_PARTS = ("accuracy", "mrr")


@dataclass
class JointEncoderTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the retrieval knobs. `remove_unused_columns` defaults to False (the collator reads
    the query columns itself)."""

    n_hard_negatives: int = field(default=1, metadata={"help": "hard negatives per query (1 positive + n per group)"})
    query_max_length: int = field(default=64, metadata={"help": "max query tokens (longer questions are truncated)"})
    passage_max_length: int = field(default=256, metadata={"help": "max passage tokens"})
    similarity: str | None = field(
        default=None, metadata={"help": "must equal the model config's similarity if given (refused otherwise)"}
    )
    logit_scale: float | None = field(
        default=None, metadata={"help": "must equal the model config's logit_scale if given (refused otherwise)"}
    )
    gather_across_processes: bool | None = field(
        default=None, metadata={"help": "share negatives across processes (default: on when world size > 1)"}
    )
    grad_cache: bool = field(default=False, metadata={"help": "GradCache: memory flat in the batch size"})
    grad_cache_chunk_size: int = field(default=32, metadata={"help": "rows per forward pass with grad_cache"})
    freeze_token_embeddings: bool = field(default=False, metadata={"help": "freeze the token embedding"})
    freeze_first_n_blocks: int = field(default=0, metadata={"help": "freeze the first N T5 blocks"})
    train_only: str | None = field(
        default=None, metadata={"help": f"train only {TRAIN_ONLY_CHOICES[0]} (VL-Adapter) or {TRAIN_ONLY_CHOICES[1]}"}
    )
    separate_towers: bool = field(
        default=False, metadata={"help": "separate query / passage encoders (initialised as copies of the model)"}
    )
    use_query_images: bool = field(default=True, metadata={"help": "False: text-only queries (ablation)"})
    use_passage_images: bool = field(default=True, metadata={"help": "False: text-only passages"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep False: the collator reads raw columns"})

    def __post_init__(self):
        super().__post_init__()
        if self.n_hard_negatives < 0:
            raise ValueError(f"n_hard_negatives must be >= 0, got {self.n_hard_negatives}")
        for name in ("query_max_length", "passage_max_length", "grad_cache_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_only is not None and self.train_only not in TRAIN_ONLY_CHOICES:
            raise ValueError(f"train_only must be one of {TRAIN_ONLY_CHOICES} or None, got {self.train_only!r}")
        if self.similarity is not None and self.similarity not in ("dot", "cosine"):
            raise ValueError(f"similarity must be 'dot' or 'cosine', got {self.similarity!r}")
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must be False: the collator reads the query columns itself")
        shares_negatives = self.world_size > 1 and self.gather_across_processes is not False
        if self.n_hard_negatives == 0 and self.per_device_train_batch_size < 2 and not shares_negatives:
            raise ValueError(
                "per_device_train_batch_size=1 with n_hard_negatives=0 (and no negatives shared across processes) "
                "leaves each query with no negative at all: raise the batch size or add hard negatives"
            )


def check_model_matches_arguments(model: PreTrainedModel, args: JointEncoderTrainingArguments) -> None:
    """The similarity / scale live in the model config (search uses them too): arguments may only repeat them."""
    config = model.config
    if args.similarity is not None and args.similarity != config.similarity:
        raise ValueError(
            f"similarity={args.similarity!r} in the arguments but the model config says {config.similarity!r}: "
            f"training and search must score alike; change config.similarity in the model instead"
        )
    if args.logit_scale is not None and not math.isclose(args.logit_scale, config.logit_scale):
        raise ValueError(
            f"logit_scale={args.logit_scale} in the arguments but the model config says {config.logit_scale}: "
            f"change config.logit_scale in the model instead"
        )


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
                use_query_images=args.use_query_images,
                use_passage_images=args.use_passage_images,
            )
            train_dataset = self.prepared_data.queries
            global_batch = args.per_device_train_batch_size * args.world_size
            if len(train_dataset) < global_batch:
                raise ValueError(
                    f"{len(train_dataset)} training queries but one global batch takes {global_batch} "
                    f"({args.world_size} process(es) x per_device_train_batch_size {args.per_device_train_batch_size}): "
                    f"lower the batch size or the number of processes"
                )
        self.evaluator = evaluator
        if evaluator is not None and eval_dataset is None:
            eval_dataset = ["retrieval evaluator"]  # Trainer wants an eval set for eval_strategy; evaluate() ignores it
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            data_collator=data_collator,
            **kwargs,
        )
        # The loss is a per-step mean over the (global) batch: the Trainer divides it for gradient accumulation.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.loss_fn = InBatchContrastiveLoss.from_config(
            self.model.config, gather_across_processes=args.gather_across_processes
        )
        if isinstance(data_collator, ContrastiveCollator):
            self.add_callback(_EpochToCollator(data_collator))
        self._loss_parts: dict[str, list[torch.Tensor]] = {name: [] for name in LOSS_PARTS}

    # ------------------------------------------------------------------------------------------------- loss
    def _embed(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.accelerator.unwrap_model(model), JointEncoderBiEncoder):
            out = model(query=inputs["query"], passage=inputs["passage"])  # one (DDP) forward for both towers
            return out.query_embeddings, out.passage_embeddings
        queries = model(**inputs["query"], return_dict=True).pooler_output  # (Q, D)
        passages = model(**inputs["passage"], return_dict=True).pooler_output  # (P, D)
        return queries, passages

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
            return super().training_step(model, inputs, num_items_in_batch)
        from .grad_cache import default_embed, grad_cache_step

        model.train()
        inputs = self._prepare_inputs(inputs)
        bi_encoder = isinstance(self.accelerator.unwrap_model(model), JointEncoderBiEncoder)

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
                no_sync=self.accelerator.no_sync,
                embed_fn=embed,
            )
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
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Retrieval metrics from `self.evaluator` (e.g. MRR@10 over the evaluation queries and KB)."""
        if self.evaluator is None:
            raise ValueError(
                "evaluate() needs a retrieval evaluator: JointEncoderTrainer(..., evaluator=RetrievalEvaluator(...))"
            )
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            if isinstance(model, JointEncoderBiEncoder):
                metrics = self.evaluator(model.query_encoder, model.passage_encoder)
            else:
                metrics = self.evaluator(model)
        model.train(was_training)
        metrics = {
            (key if key.startswith(f"{metric_key_prefix}_") else f"{metric_key_prefix}_{key}"): float(value)
            for key, value in metrics.items()
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ------------------------------------------------------------------------------ separate towers: resume
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = model if model is not None else self.model
        if isinstance(self.accelerator.unwrap_model(target), JointEncoderBiEncoder):
            self.accelerator.unwrap_model(target).load_towers_(resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if isinstance(self.accelerator.unwrap_model(self.model), JointEncoderBiEncoder):
            self.accelerator.unwrap_model(self.model).load_towers_(self.state.best_model_checkpoint)
            return
        super()._load_best_model()

    # ------------------------------------------------------------------------------------------- model card
    def save_final_model(self, output_dir: str | None = None, results: dict | None = None, data_description: str = "",
                         base_model: str | None = None) -> str:
        """`save_model` (weights + remote code + tokenizer/processor) and a README.md model card."""
        output_dir = output_dir or self.args.output_dir
        self.save_model(output_dir)
        if self.args.should_save:
            from .bi_encoder import TOWERS
            from .training_card import write_trained_model_card

            if self.processing_class is not None and isinstance(self.accelerator.unwrap_model(self.model),
                                                                JointEncoderBiEncoder):
                for tower in TOWERS:  # each tower folder loads on its own, tokenizer / processor included
                    self.processing_class.save_pretrained(os.path.join(output_dir, tower))

            # The released folder carries the arguments as JSON, not as Trainer's pickled training_args.bin: nobody
            # should have to unpickle a file from a model repo to learn how it was trained.
            pickled = os.path.join(output_dir, "training_args.bin")
            if os.path.exists(pickled):
                os.remove(pickled)
            with open(os.path.join(output_dir, "training_args.json"), "w", encoding="utf-8") as handle:
                handle.write(self.args.to_json_string())
            write_trained_model_card(self, output_dir, results or {}, data_description, base_model)
        return output_dir


__all__ = ["JointEncoderTrainer", "JointEncoderTrainingArguments", "check_model_matches_arguments"]
