"""Separate query and passage towers as ONE `PreTrainedModel` (so the Trainer saves, resumes and wraps it natively).

Saved as `query_encoder/` and `passage_encoder/` sub-folders, each a complete `JointEncoderModel` (config with
`auto_map`, remote code, safetensors) that `AutoModel.from_pretrained(path/"query_encoder", trust_remote_code=True)`
loads on its own. Tevatron wrapped its towers in a plain `nn.Module` and needed custom save / resume code for it;
here the towers are submodules of a `PreTrainedModel`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

from .configuration_joint_encoder import JointEncoderConfig
from .modeling_joint_encoder import JointEncoderModel, JointEncoderPreTrainedModel
from .sentence_transformers_files import write_router_files
from .utils.io import write_json


logger = logging.get_logger(__name__)

TOWERS = ("query_encoder", "passage_encoder")
BI_ENCODER_FILE = "bi_encoder.json"


@dataclass
class BiEncoderOutput(ModelOutput):
    """query_embeddings (Q, D) and passage_embeddings (P, D): each tower's `pooler_output` (None if not asked)."""

    query_embeddings: torch.FloatTensor | None = None
    passage_embeddings: torch.FloatTensor | None = None


class JointEncoderBiEncoder(JointEncoderPreTrainedModel):
    """
    Two `JointEncoderModel` towers: `query_encoder` (question + image) and `passage_encoder` (passage text, with or
    without image). `config` is the query tower's config; scoring uses it (`similarity`, `logit_scale`), and the
    passage tower must agree on `similarity` and embedding size.

    `forward(query=..., passage=...)` encodes either or both in one call (one DDP forward per step).
    """

    base_model_prefix = "bi_encoder"

    def __init__(self, config: JointEncoderConfig, passage_config: JointEncoderConfig | None = None):
        super().__init__(config)
        passage_config = passage_config or config
        _check_compatible(config, passage_config)
        self.query_encoder = JointEncoderModel(config)
        self.passage_encoder = JointEncoderModel(passage_config)
        self.post_init()

    @classmethod
    def from_encoders(cls, query_encoder: JointEncoderModel, passage_encoder: JointEncoderModel) -> JointEncoderBiEncoder:
        """Wrap two existing towers (e.g. two copies of one pretrained encoder, as DPR initialises both from BERT)."""
        _check_compatible(query_encoder.config, passage_encoder.config)
        model = cls.__new__(cls)
        JointEncoderPreTrainedModel.__init__(model, query_encoder.config)
        model.query_encoder = query_encoder
        model.passage_encoder = passage_encoder
        return model

    @classmethod
    def from_shared(cls, encoder: JointEncoderModel) -> JointEncoderBiEncoder:
        """Two independent copies of one encoder (separate towers initialised from the same weights)."""
        import copy

        return cls.from_encoders(encoder, copy.deepcopy(encoder))

    def forward(self, query: dict | None = None, passage: dict | None = None, **kwargs) -> BiEncoderOutput:
        if kwargs:
            raise TypeError(
                f"JointEncoderBiEncoder.forward takes query=dict(...) and passage=dict(...) model inputs, got {sorted(kwargs)}"
            )
        if query is None and passage is None:
            raise ValueError("give query and/or passage inputs")
        return BiEncoderOutput(
            query_embeddings=None if query is None else self.query_encoder(**query, return_dict=True).pooler_output,
            passage_embeddings=None if passage is None else self.passage_encoder(**passage, return_dict=True).pooler_output,
        )

    def similarity(self, query_embeddings: torch.Tensor, passage_embeddings: torch.Tensor, scale: bool = False):
        return self.query_encoder.similarity(query_embeddings, passage_embeddings, scale=scale)

    # ---------------------------------------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None, **kwargs) -> None:
        """Write `query_encoder/` and `passage_encoder/` (each loadable with AutoModel) and `bi_encoder.json`, and the
        sentence-transformers files (a Router over the two towers)."""
        is_main_process = kwargs.get("is_main_process", True)
        os.makedirs(save_directory, exist_ok=True)
        for tower in TOWERS:
            tower_state = None
            if state_dict is not None:
                prefix = f"{tower}."
                tower_state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            getattr(self, tower).save_pretrained(os.path.join(save_directory, tower), state_dict=tower_state, **kwargs)
        if is_main_process:
            path = os.path.join(save_directory, BI_ENCODER_FILE)
            write_json(path, {"architecture": type(self).__name__, "towers": list(TOWERS)})
            # sentence-transformers: a Router whose query / document routes are the two towers
            write_router_files(save_directory, self.config, TOWERS)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs) -> JointEncoderBiEncoder:
        """Load a folder written by `save_pretrained` (two sub-folders)."""
        path = os.fspath(pretrained_model_name_or_path)
        if not is_bi_encoder_dir(path):
            raise ValueError(
                f"{path!r} is not a bi-encoder folder (no query_encoder/ and passage_encoder/): load a shared-tower "
                f"model with JointEncoderModel / AutoModel instead"
            )
        towers = [JointEncoderModel.from_pretrained(os.path.join(path, tower), *args, **kwargs) for tower in TOWERS]
        return cls.from_encoders(*towers)

    def load_towers_(self, path: str | os.PathLike) -> None:
        """Load both towers' weights in place from a saved folder (checkpoint resume)."""
        from safetensors.torch import load_file

        for tower in TOWERS:
            weights = os.path.join(path, tower, "model.safetensors")
            if not os.path.isfile(weights):
                raise ValueError(f"checkpoint {os.fspath(path)!r} lacks {tower}/model.safetensors")
            missing, unexpected = getattr(self, tower).load_state_dict(load_file(weights), strict=False)
            missing = [k for k in missing if not k.startswith("vision_model.")]
            if missing or unexpected:
                raise ValueError(f"{tower} weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def is_bi_encoder_dir(path: str | os.PathLike) -> bool:
    return all(os.path.isfile(os.path.join(path, tower, "config.json")) for tower in TOWERS)


def _check_compatible(query_config: JointEncoderConfig, passage_config: JointEncoderConfig) -> None:
    if query_config.similarity != passage_config.similarity:
        raise ValueError(
            f"query tower similarity {query_config.similarity!r} != passage tower {passage_config.similarity!r}"
        )
    if query_config.embedding_dim != passage_config.embedding_dim:
        raise ValueError(
            f"query embeddings have {query_config.embedding_dim} dims but passage embeddings {passage_config.embedding_dim}"
        )


__all__ = ["JointEncoderBiEncoder", "BiEncoderOutput", "is_bi_encoder_dir"]
