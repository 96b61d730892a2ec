"""vl-joint-encoder: the VL-T5 / VL-Adapter joint encoder as a Hugging Face transformers model and dense retriever.

`import vl_joint_encoder` is light: it imports neither torch nor transformers. It registers `JointEncoderConfig`,
`JointEncoderModel` and `JointEncoderProcessor` with `AutoConfig` / `AutoModel` / `AutoProcessor` as soon as
transformers loads those Auto classes (see `registration`), and marks them for export as remote code. The names below
are imported on first use (PEP 562 module `__getattr__`), so `from vl_joint_encoder import JointEncoderModel` loads
the model code only, and the trainer or the retrieval code only when asked for.

Layout (lower layers never import higher ones; `layers.txt` lists them and a test checks it):
    configuration / modeling / processing / tokenization_joint_encoder, images, vision, bi_encoder   the model
    data/        tables (ColumnMapping, queries and KB), references, feature stores, inputs (the batch builder)
    retrieval/   embed (model loading, batching, fingerprints), encode, store, search, metrics (ranx), evaluator
    training/    arguments, collator, loss, grad_cache, distributed, freezing, trainer, model card
    commands/    one module per `vl-joint-encoder` command, arguments as dataclasses; cli.py dispatches
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import registration
from .utils.version import __version__


# public name -> module (relative to this package) that defines it
_EXPORTS = {
    "JointEncoderConfig": "configuration_joint_encoder",
    "JointEncoderModel": "modeling_joint_encoder",
    "JointEncoderOutput": "modeling_joint_encoder",
    "JointEncoderPreTrainedModel": "modeling_joint_encoder",
    "JointEncoderProcessor": "processing_joint_encoder",
    "JointEncoderBiEncoder": "bi_encoder",
    "ColumnMapping": "data.tables",
    "RetrievalEvaluator": "retrieval.evaluator",
    "InBatchContrastiveLoss": "training.loss",
    "JointEncoderTrainer": "training.trainer",
    "JointEncoderTrainingArguments": "training.arguments",
}

__all__ = [
    "ColumnMapping",
    "InBatchContrastiveLoss",
    "JointEncoderBiEncoder",
    "JointEncoderConfig",
    "JointEncoderModel",
    "JointEncoderOutput",
    "JointEncoderPreTrainedModel",
    "JointEncoderProcessor",
    "JointEncoderTrainer",
    "JointEncoderTrainingArguments",
    "RetrievalEvaluator",
    "__version__",
]

registration.install()


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # the next access is a plain attribute lookup
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs only; at run time the names come from __getattr__
    from .bi_encoder import JointEncoderBiEncoder
    from .configuration_joint_encoder import JointEncoderConfig
    from .data.tables import ColumnMapping
    from .modeling_joint_encoder import JointEncoderModel, JointEncoderOutput, JointEncoderPreTrainedModel
    from .processing_joint_encoder import JointEncoderProcessor
    from .retrieval.evaluator import RetrievalEvaluator
    from .training.arguments import JointEncoderTrainingArguments
    from .training.loss import InBatchContrastiveLoss
    from .training.trainer import JointEncoderTrainer
