"""vl-joint-encoder: the VL-T5 / VL-Adapter joint encoder as a Hugging Face transformers model and dense retriever.

Importing the package registers `JointEncoderConfig` / `JointEncoderModel` with `AutoConfig` / `AutoModel`, and marks
them for export as remote code (so `save_pretrained` writes `auto_map` and copies the two files next to the weights).
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .bi_encoder import JointEncoderBiEncoder
from .configuration_joint_encoder import JointEncoderConfig
from .evaluation import RetrievalEvaluator
from .modeling_joint_encoder import JointEncoderModel, JointEncoderOutput, JointEncoderPreTrainedModel
from .processing_joint_encoder import JointEncoderProcessor


__version__ = "0.1.0"

AutoConfig.register(JointEncoderConfig.model_type, JointEncoderConfig, exist_ok=True)
AutoModel.register(JointEncoderConfig, JointEncoderModel, exist_ok=True)
JointEncoderConfig.register_for_auto_class()
JointEncoderModel.register_for_auto_class("AutoModel")
AutoProcessor.register(JointEncoderConfig, JointEncoderProcessor, exist_ok=True)
JointEncoderProcessor.register_for_auto_class()

__all__ = [
    "JointEncoderConfig",
    "JointEncoderModel",
    "JointEncoderOutput",
    "JointEncoderPreTrainedModel",
    "JointEncoderProcessor",
    "JointEncoderBiEncoder",
    "RetrievalEvaluator",
    "__version__",
]
