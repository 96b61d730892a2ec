"""`JointEncoderTrainingArguments`: transformers' `TrainingArguments` plus the retrieval knobs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import PreTrainedModel, TrainingArguments

from .freezing import TRAIN_ONLY_CHOICES


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
    lora_r: int | None = field(
        default=None, metadata={"help": "train LoRA adapters of this rank (PEFT) instead of the whole encoder"}
    )
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA scaling alpha / r (default: alpha = 2 r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "layers LoRA wraps: presets attention, visual (default: both), ffn, all-linear, or names"},
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "modules trained fully with LoRA (default: projection, if any; e.g. visual_embedding)"},
    )
    lora_merge: bool = field(default=False, metadata={"help": "also save the merged model in <output_dir>/merged"})
    use_query_images: bool = field(default=True, metadata={"help": "False: text-only queries (ablation)"})
    use_passage_images: bool = field(default=True, metadata={"help": "False: text-only passages"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep False: the collator reads raw columns"})

    def __post_init__(self):
        # `load_best_model_at_end` without `metric_for_best_model`: TrainingArguments would pick "loss", which a
        # retrieval evaluation does not compute; the trainer uses the evaluator's primary metric instead.
        self.metric_from_evaluator = self.metric_for_best_model is None
        super().__post_init__()
        if self.n_hard_negatives < 0:
            raise ValueError(f"n_hard_negatives must be >= 0, got {self.n_hard_negatives}")
        for name in ("query_max_length", "passage_max_length", "grad_cache_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_only is not None and self.train_only not in TRAIN_ONLY_CHOICES:
            raise ValueError(f"train_only must be one of {TRAIN_ONLY_CHOICES} or None, got {self.train_only!r}")
        if self.lora_r is not None:
            if self.lora_r < 1:
                raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")
            if self.train_only is not None or self.freeze_first_n_blocks or self.freeze_token_embeddings:
                raise ValueError(
                    "lora_r trains LoRA adapters only: drop train_only / freeze_first_n_blocks / freeze_token_embeddings"
                )
            if self.separate_towers:
                raise ValueError("lora_r with separate_towers is not supported yet: train LoRA on a shared tower")
        elif self.lora_merge:
            raise ValueError("lora_merge needs lora_r (there is no LoRA adapter to merge)")
        if self.lora_modules_to_save is not None and [m.lower() for m in self.lora_modules_to_save] == ["none"]:
            self.lora_modules_to_save = []
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


__all__ = ["JointEncoderTrainingArguments", "check_model_matches_arguments"]
