"""The files sentence-transformers reads in a model folder, written next to what transformers reads.

`JointEncoderModel.save_pretrained` (and `JointEncoderBiEncoder.save_pretrained`) call `write_sentence_transformers_files`,
so every folder this package saves (converted, built or trained; one tower or two) also loads with
`SentenceTransformer(folder, trust_remote_code=True)`. The format is sentence-transformers' own (v6,
`sentence_transformers/base/model.py` `save` / `_load_config_modules`, `base/modules/router.py` `save` / `load`):
- `modules.json`: the module pipeline, `[{"idx", "name", "path", "type"}]`. A `type` outside the `sentence_transformers.*`
  namespace is `"<file>.<Class>"`, resolved with `transformers.dynamic_module_utils.get_class_from_dynamic_module` in
  the model folder (`util/misc.py` `import_module_class`), which needs `trust_remote_code=True`;
- `config_sentence_transformers.json`: `model_type`, `prompts`, `default_prompt_name`, `similarity_fn_name`;
- the module's own config (`JointEncoderModule.config_file_name`);
- separate towers: one `Router` module (`router_config.json`: `types`, `structure`, `parameters`) whose `query` route is
  `query_encoder/` and `document` route `passage_encoder/`, so `encode_query` / `encode_document` pick the tower.

This file imports only the standard library and transformers' logging: it runs inside `save_pretrained` (also as remote code) without importing
sentence-transformers. The module class is in `sentence_transformers_joint_encoder.py`, copied next to the weights from
this file's folder (where the package, or sentence-transformers' remote-code loading, put it). A copy of the code that
lacks it (a model loaded from the Hub with `AutoModel` only) saves no sentence-transformers files, and says so.
"""

from __future__ import annotations

import json
import os
import shutil

from transformers.utils import logging


MODULE_FILE = "sentence_transformers_joint_encoder"  # the remote-code file of the module class (without .py)
MODULE_CLASS = "JointEncoderModule"
MODULE_TYPE = f"{MODULE_FILE}.{MODULE_CLASS}"
MODULE_CONFIG_FILE = "sentence_transformers_joint_encoder.json"
ROUTER_TYPE = "sentence_transformers.base.modules.router.Router"
ROUTER_CONFIG_FILE = "router_config.json"
MODEL_CONFIG_FILE = "config_sentence_transformers.json"
MODULES_FILE = "modules.json"
logger = logging.get_logger(__name__)
# the lengths the package trains with (JointEncoderTrainingArguments query_max_length / passage_max_length)
DEFAULT_MODULE_CONFIG = {"query_max_length": 64, "max_seq_length": 256}


def _write(path: str, content: dict | list) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2, sort_keys=isinstance(content, dict))
        handle.write("\n")
    os.replace(tmp, path)


def _model_config(similarity: str) -> dict:
    # sentence-transformers names its similarities as ours ("cosine", "dot"): model.similarity is ours
    return {
        "model_type": "SentenceTransformer",
        "prompts": {"query": "", "document": ""},
        "default_prompt_name": None,
        "similarity_fn_name": similarity,
    }


def copy_module_code(folder: str) -> bool:
    """Copy the module's file and every file it imports relatively (the model's code files) into `folder`, as
    transformers' `custom_object_save` copies remote code; False (and a warning) when this copy of the code lacks it."""
    from transformers.dynamic_module_utils import get_relative_import_files

    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{MODULE_FILE}.py")
    if not os.path.isfile(source):
        logger.warning(
            f"{MODULE_FILE}.py is not next to this copy of the model code ({os.path.dirname(source)}), so {folder} gets "
            f"no sentence-transformers files; save the model with the vl-joint-encoder package installed to add them"
        )
        return False
    for path in [source, *get_relative_import_files(source)]:
        target = os.path.join(folder, os.path.basename(path))
        if os.path.abspath(path) != os.path.abspath(target):
            shutil.copyfile(path, target)
    return True


def write_sentence_transformers_files(folder: str | os.PathLike, config, module_config: dict | None = None) -> None:
    """One tower: the module's code file, `modules.json` with the joint-encoder module at the root, the model config,
    the module config (kept when already there, e.g. written by the module itself, unless `module_config` is given)."""
    folder = os.fspath(folder)
    if not copy_module_code(folder):
        return
    _write(os.path.join(folder, MODULES_FILE), [{"idx": 0, "name": "0", "path": "", "type": MODULE_TYPE}])
    _write(os.path.join(folder, MODEL_CONFIG_FILE), _model_config(config.similarity))
    module_config_path = os.path.join(folder, MODULE_CONFIG_FILE)
    if module_config is not None or not os.path.isfile(module_config_path):
        _write(module_config_path, dict(module_config or DEFAULT_MODULE_CONFIG))


def write_router_files(folder: str | os.PathLike, config, towers: tuple[str, str]) -> None:
    """Separate towers saved as `folder/<query tower>/` and `folder/<passage tower>/` (each already a complete
    one-tower folder): a `Router` at the root routing `query` to the first and `document` to the second. The router
    resolves the module class in the root folder, so the code files are copied there too."""
    folder = os.fspath(folder)
    query_tower, passage_tower = towers
    if not copy_module_code(folder):
        return
    _write(os.path.join(folder, MODULES_FILE), [{"idx": 0, "name": "0", "path": "", "type": ROUTER_TYPE}])
    _write(os.path.join(folder, MODEL_CONFIG_FILE), _model_config(config.similarity))
    _write(
        os.path.join(folder, ROUTER_CONFIG_FILE),
        {
            "types": {query_tower: MODULE_TYPE, passage_tower: MODULE_TYPE},
            "structure": {"query": [query_tower], "document": [passage_tower]},
            "parameters": {"default_route": "document", "allow_empty_key": True, "route_mappings": {}},
        },
    )


__all__ = [
    "MODULE_CONFIG_FILE",
    "MODULE_TYPE",
    "write_router_files",
    "write_sentence_transformers_files",
]
