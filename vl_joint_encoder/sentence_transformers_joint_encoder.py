"""The joint encoder as a sentence-transformers input module: `SentenceTransformer(folder, trust_remote_code=True)`.

sentence-transformers (>= 6; multimodal inputs since 5.4) builds a model from the modules listed in `modules.json`;
a module outside its namespace is a class in a file of the model folder, loaded with `trust_remote_code=True`
(`sentence_transformers/util/misc.py` `import_module_class`). This file is that class: an `InputModule`
(`sentence_transformers/base/modules/input_module.py`) whose `preprocess` turns sentence-transformers inputs into the
package's batches and whose `forward` returns `JointEncoderModel.encode`, so that `model.encode(...)` gives exactly the
package's embeddings and `model.similarity` (from `similarity_fn_name`) is `JointEncoderModel.similarity`.

Inputs, as sentence-transformers passes them to `encode` / `encode_query` / `encode_document` (its multimodal dicts,
`base/modality_types.py` `MultimodalInput`):
- `"a question"`: text only;
- a PIL image: image only (visual tokens alone, no text);
- `{"text": ..., "image": ...}`: both; `"image"` may be one image, a list of images (up to `config.n_images`) or None
  (text only: a passage without image in a dataset column). With a vision tower an image is a PIL image or a file
  path; a model without one (precomputed features) takes an array `(visual tokens, feat_dim)` instead.
A batch may mix them: rows with text and rows without are encoded in two forward passes (the model has no "empty
text"), each exactly as the package encodes it (the processor's `text=..., images=...` / `visual_feats=...`).

This file imports only torch, the standard library and the model's own files (remote code); sentence-transformers
itself is imported in a `try` block (transformers' import check skips it, so `AutoModel` loads the folder without it).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .configuration_joint_encoder import JointEncoderConfig
from .modeling_joint_encoder import JointEncoderModel
from .processing_joint_encoder import JointEncoderProcessor
from .sentence_transformers_files import DEFAULT_MODULE_CONFIG, MODULE_CONFIG_FILE


try:
    from sentence_transformers.base.modules import InputModule
except ImportError as error:  # pragma: no cover - only reached without sentence-transformers
    raise ImportError(
        "the joint encoder's sentence-transformers module needs sentence-transformers >= 6: "
        "pip install 'sentence-transformers>=6'"
    ) from error


GROUPS = ("text", "visual")  # rows with text (and maybe images), rows with images only
IMAGE_ONLY_SUFFIX = "__image_only"  # model inputs of the image-only rows of a batch that also has rows with text


class JointEncoderModule(InputModule):
    """
    A `JointEncoderModel` (one tower) and its `JointEncoderProcessor` as the first (and only) module of a
    `SentenceTransformer`; the output feature is `sentence_embedding` = `JointEncoderModel.encode` (L2-normalised iff
    the model's similarity is cosine). Separate towers are two of these under a `Router` (see
    `sentence_transformers_files.write_router_files`).

    Args:
        model: the tower.
        processor: its processor (tokenizer + image processor, text prefix).
        max_seq_length: text truncation in tokens (passages and `encode`); default 256 as the package's passages.
        query_max_length: text truncation for `task="query"` (`encode_query`); default 64 as the package's queries.
    """

    config_file_name = MODULE_CONFIG_FILE
    config_keys = ["max_seq_length", "query_max_length"]
    save_in_root = True

    def __init__(
        self,
        model: JointEncoderModel,
        processor: JointEncoderProcessor,
        max_seq_length: int | None = DEFAULT_MODULE_CONFIG["max_seq_length"],
        query_max_length: int | None = DEFAULT_MODULE_CONFIG["query_max_length"],
    ):
        super().__init__()
        if not isinstance(model, JointEncoderModel):
            raise ValueError(f"model must be a JointEncoderModel (one tower), got {type(model).__name__}")
        self.model = model
        self.processor = processor
        self.max_seq_length = max_seq_length
        self.query_max_length = query_max_length

    # ------------------------------------------------------------------------------------------- properties
    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def modalities(self) -> list:
        # "message": sentence-transformers infers it for a batch that mixes modalities (`base/modality.py`
        # `infer_batch_modality`) and lets such a batch through only to modules that list it; chat messages themselves
        # ({"role", "content"}) are refused by `preprocess`
        return ["text", "image", ("image", "text"), "message"]

    @property
    def has_vision_tower(self) -> bool:
        return self.model.vision_model is not None

    def get_embedding_dimension(self) -> int:
        return self.model.config.embedding_dim

    # ----------------------------------------------------------------------------------------- preprocessing
    def _split(self, item: Any, position: int) -> tuple[str | None, list]:
        """One input -> (text or None, list of images / feature arrays)."""
        if isinstance(item, str):
            return item, []
        if isinstance(item, dict):
            unknown = set(item) - {"text", "image"}
            if unknown == {"role", "content"}:
                raise ValueError(
                    f"input {position} is a chat message: the joint encoder takes a string, an image, "
                    f"or {{'text': ..., 'image': ...}}"
                )
            if unknown:
                raise ValueError(
                    f"input {position} has keys {sorted(unknown)}: the joint encoder takes 'text' and 'image' "
                    f"({{'text': question, 'image': photo}})"
                )
            text = item.get("text")
            if text is not None and not isinstance(text, str):
                raise ValueError(f"input {position}: 'text' must be a string, got {type(text).__name__}")
            images = item.get("image")
            if images is None:
                images = []
            elif isinstance(images, tuple) or (isinstance(images, list) and not self._is_feature_array(images)):
                images = [image for image in images if image is not None]
            else:
                images = [images]
            if text is None and not images:
                raise ValueError(f"input {position} has neither text nor image")
            return text, images
        if isinstance(item, (list, tuple)):
            raise ValueError(
                f"input {position} is a {type(item).__name__}: pairs are not an input of a bi-encoder; give a string, "
                f"an image, or {{'text': ..., 'image': ...}}"
            )
        return None, [item]  # an image (or a feature array for a model without vision tower)

    def _is_feature_array(self, value: Any) -> bool:
        """A nested list that is one (visual tokens, feat_dim) array, as a `datasets` column returns it."""
        return (
            not self.has_vision_tower
            and isinstance(value, list)
            and len(value) > 0
            and isinstance(value[0], (list, tuple))
            and len(value[0]) > 0
            and isinstance(value[0][0], (int, float))
        )

    def _features(self, images: list, position: int) -> list:
        """Feature arrays (V, feat_dim) of one input, for a model without vision tower."""
        import numpy as np

        arrays = []
        for image in images:
            if hasattr(image, "detach"):
                image = image.detach().cpu().float().numpy()
            array = np.asarray(image, dtype=np.float32) if not hasattr(image, "convert") else None
            feat_dim = self.model.config.feat_dim
            if array is None or array.ndim != 2 or array.shape[1] != feat_dim:
                got = type(image).__name__ if array is None else f"an array of shape {array.shape}"
                raise ValueError(
                    f"input {position}: this model has no vision tower (config.vision_config is None), so an image "
                    f"must be precomputed features of shape (visual tokens, {feat_dim}), got {got}; build the model "
                    f"with a vision tower (vl-joint-encoder build) to give photos"
                )
            arrays.append(array)
        return arrays

    def preprocess(
        self, inputs, prompt: str | None = None, task: str | None = None, max_length: int | None = None, **kwargs
    ) -> dict[str, torch.Tensor]:
        """Inputs -> model inputs of the rows with text (plain names: `input_ids`, `pixel_values`, ...) and of the rows
        with images only (names ending in `__image_only`, or plain when no row has text), and the positions of each
        group's rows (`rows`, `rows__image_only`). Plain names first: sentence-transformers' trainer finds a column's
        features by the `<column>_input_ids` / `<column>_pixel_values` keys (`base/trainer.py` `collect_features`)."""
        if max_length is None:
            max_length = self.query_max_length if task == "query" else self.max_seq_length
        groups: dict[str, list] = {group: [] for group in GROUPS}
        for position, item in enumerate(inputs):
            text, images = self._split(item, position)
            if images and not self.has_vision_tower:
                images = self._features(images, position)
            if text is not None:
                groups["text"].append((position, prompt + text if prompt else text, images))
            else:
                groups["visual"].append((position, None, images))
        features: dict[str, torch.Tensor] = {}
        for group, rows in groups.items():
            if not rows:
                continue
            suffix = IMAGE_ONLY_SUFFIX if group == "visual" and groups["text"] else ""
            texts = [text for _, text, _ in rows] if group == "text" else None
            per_row = [images or None for _, _, images in rows]
            visual = {}
            if any(images is not None for images in per_row):
                visual = {"visual_feats": per_row} if not self.has_vision_tower else {"images": per_row}
            batch = self.processor(
                text=texts, **visual, return_tensors="pt", padding=True, truncation=True, max_length=max_length
            )
            for key, value in batch.items():
                features[key + suffix] = value
            features["rows" + suffix] = torch.tensor([position for position, _, _ in rows], dtype=torch.long)
        return features

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        embeddings, rows = [], []
        names = self.processor.model_input_names
        for suffix in ("", IMAGE_ONLY_SUFFIX):
            if "rows" + suffix not in features:
                continue
            inputs = {name: features[name + suffix] for name in names if name + suffix in features}
            embeddings.append(self.model.encode(**inputs))  # (b, D)
            rows.append(features["rows" + suffix])
        if not embeddings:
            raise ValueError("no inputs to encode: features come from JointEncoderModule.preprocess")
        if len(embeddings) == 1:
            embedding = embeddings[0]
        else:  # back to the input order (differentiable: a gather)
            order = torch.argsort(torch.cat(rows).to(embeddings[0].device))
            embedding = torch.cat(embeddings)[order]
        features["sentence_embedding"] = embedding
        return features

    # ----------------------------------------------------------------------------------------- save / load
    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        """The tower and processor as `save_pretrained` writes them (transformers and sentence-transformers files),
        then this module's config."""
        self.model.save_pretrained(output_path)
        self.processor.save_pretrained(output_path)
        self.save_config(output_path)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ) -> JointEncoderModule:
        config = cls.load_config(
            model_name_or_path,
            subfolder=subfolder,
            token=token,
            cache_folder=cache_folder,
            revision=revision,
            local_files_only=local_files_only,
        )
        unknown = set(config) - set(cls.config_keys)
        if unknown:
            raise ValueError(
                f"{os.path.join(model_name_or_path, subfolder, MODULE_CONFIG_FILE)} has unknown keys {sorted(unknown)}; "
                f"known: {cls.config_keys}"
            )
        hub = {"token": token, "cache_dir": cache_folder, "revision": revision, "local_files_only": local_files_only}
        if subfolder:
            hub["subfolder"] = subfolder
        model_kwargs = {k: v for k, v in (model_kwargs or {}).items() if k != "trust_remote_code"}
        # exported again by save(): auto_map and the code files next to the weights, whichever copy of the code runs
        JointEncoderConfig.register_for_auto_class()
        JointEncoderModel.register_for_auto_class("AutoModel")
        JointEncoderProcessor.register_for_auto_class()
        model = JointEncoderModel.from_pretrained(model_name_or_path, **hub, **model_kwargs)
        try:
            processor = JointEncoderProcessor.from_pretrained(model_name_or_path, **hub, **(processor_kwargs or {}))
        except (OSError, ValueError, TypeError) as error:
            where = os.path.join(model_name_or_path, subfolder)
            raise ValueError(
                f"{where} has no JointEncoderProcessor (processor_config.json + tokenizer), which sentence-transformers "
                f"needs to encode text and images ({type(error).__name__}: {error}); save it next to the model: "
                f"JointEncoderProcessor.from_model_config(model.config, tokenizer).save_pretrained({where!r})"
            ) from error
        return cls(model, processor, **config)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> JointEncoderModule:
        """The module of a saved one-tower folder (for `SentenceTransformer(modules=[...])`)."""
        return cls.load(path, **kwargs)


__all__ = ["JointEncoderModule"]
