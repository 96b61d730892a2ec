"""Embedding: the one model loader, batched `model.encode`, and the fingerprints that identify a model and a KB.

Every job that embeds (training's evaluation, `encode`, `search`, `RetrievalEvaluator`) loads models with
`load_model_and_processor` and embeds with `embed_batches`, whose batches come from `data.inputs` (the batch
builder of training), so a passage gets the same embedding whichever job computes it.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from queue import Full, Queue
from typing import Any

import torch
from transformers.utils import logging

from ..bi_encoder import TOWERS, JointEncoderBiEncoder, is_bi_encoder_dir
from ..data.inputs import JointEncoderInputBuilder
from ..modeling_joint_encoder import JointEncoderModel


logger = logging.get_logger(__name__)

AUTOCAST_DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------ loading
HUB_ID = re.compile(r"^(?![.-])[\w.-]{1,96}(/(?![.-])[\w.-]{1,96})?$")


def check_model_location(path: str, option: str = "model") -> None:
    """
    Refuse, before any loading, a model path that is neither an existing folder nor shaped like a Hub id
    (`name` or `owner/name`): transformers would answer "Repo id must be in the form ..." for a mistyped folder.
    """
    if os.path.exists(path):
        return
    if not HUB_ID.match(path) or "--" in path or ".." in path or path.endswith((".", "-")):
        raise ValueError(
            f"{option} {path!r} does not exist: give the folder written by save_pretrained / vl-joint-encoder train / "
            f"build (check the path), or a Hub id (owner/name)"
        )


def _from_pretrained(cls, path: str, option: str = "model"):
    """`cls.from_pretrained(path)`, with a clear error for a Hub id that cannot be loaded."""
    check_model_location(path, option)
    try:
        return cls.from_pretrained(path)
    except (OSError, ValueError) as error:
        if os.path.exists(path):
            raise
        raise ValueError(
            f"{option} {path!r} is not a local folder, and loading it as a Hub id failed ({error}): check the path "
            f"or the id (offline, HF_HUB_OFFLINE=1, only models already in the cache load)"
        ) from None


def _load_processing(candidate: str, tokenizer_only: bool = False):
    """A JointEncoderProcessor (when the folder has `processor_config.json`) or a tokenizer, or None."""
    from transformers import AutoTokenizer

    from ..processing_joint_encoder import JointEncoderProcessor

    if os.path.isdir(candidate):
        if not tokenizer_only and os.path.isfile(os.path.join(candidate, "processor_config.json")):
            return JointEncoderProcessor.from_pretrained(candidate)
        if os.path.isfile(os.path.join(candidate, "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(candidate)
        return None
    try:  # a hub id
        if not tokenizer_only:
            try:
                return JointEncoderProcessor.from_pretrained(candidate)
            except (OSError, ValueError, TypeError):
                pass
        return AutoTokenizer.from_pretrained(candidate)
    except (OSError, ValueError):
        return None


def load_model_and_processor(
    path: str | os.PathLike,
    tower: str | None = None,
    processor_path: str | None = None,
    tokenizer_path: str | None = None,
):
    """
    (model, processor or tokenizer) from a saved model folder or hub id.

    Args:
        path: a `JointEncoderModel` folder / hub id, or a separate-towers folder (`query_encoder/` +
            `passage_encoder/`).
        tower: for a separate-towers folder, `"query_encoder"` or `"passage_encoder"` loads that tower alone;
            `None` loads both as a `JointEncoderBiEncoder`. Ignored for a shared-tower model.
        processor_path / tokenizer_path: where the processing class is (default: the model folder, then the tower
            folder). A `processor_config.json` gives a `JointEncoderProcessor` (needed for image files), else the
            tokenizer is used.
    """
    path = os.fspath(path)
    check_model_location(path)
    if tower is not None and tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS} or None, got {tower!r}")
    if os.path.exists(path) and not os.path.isfile(os.path.join(path, "config.json")) and not is_bi_encoder_dir(path):
        raise ValueError(
            f"{path!r} is not a saved model folder (no config.json, no query_encoder/ + passage_encoder/): give the "
            f"folder written by save_pretrained / vl-joint-encoder train, or a hub id"
        )
    if is_bi_encoder_dir(path):
        folder = os.path.join(path, tower or TOWERS[0])
        model = JointEncoderModel.from_pretrained(folder) if tower else JointEncoderBiEncoder.from_pretrained(path)
        defaults = [path, folder]
    else:
        model = _from_pretrained(JointEncoderModel, path)
        defaults = [path]
    if tokenizer_path is not None and processor_path is None:
        processing = _load_processing(tokenizer_path, tokenizer_only=True)
        candidates = [tokenizer_path]
    else:
        candidates = [processor_path] if processor_path else defaults
        processing = next((p for p in map(_load_processing, candidates) if p is not None), None)
    if processing is None:
        raise ValueError(
            f"no tokenizer or processor found in {candidates}: save one next to the model or pass --processor"
        )
    return model, processing


# ------------------------------------------------------------------------------------------------ fingerprints
def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the weights (names, dtypes, shapes, bytes) and of the retrieval-relevant config: identifies a model."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    for field in ("similarity", "normalize", "pooling", "projection_dim"):
        digest.update(f"{field}={getattr(config, field, None)};".encode())
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ batches
def check_max_length(max_length: int, what: str = "max_length") -> None:
    """Refuse a truncation length < 1 (a tokenizer would silently read 0 as "no limit" / its default)."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"{what} must be a positive number of tokens, got {max_length!r}")


_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """
    Iterate `items` (e.g. batches being tokenised) in a background thread, `depth` ahead of the consumer, so that
    building the next batch overlaps the model's forward on this one (tokenizers and torch ops release the GIL).
    The order is unchanged; an error raised while producing is raised here, in the consumer; stopping early stops
    the producer.
    """
    queue: Queue = Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
            put(_Failure(error))
            return
        put(_DONE)

    thread = threading.Thread(target=produce, name="vl-joint-encoder-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a batch moved to `device` (pinned and copied asynchronously when it is a GPU)."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def forward_batch(
    model: torch.nn.Module,
    batch: dict[str, Any],
    autocast_dtype: str = "float32",
    device: torch.device | None = None,
    normalize: bool | None = None,
) -> torch.Tensor:
    """(b, D) float32 CPU embeddings of one built batch: `model.encode` under autocast."""
    device = device if device is not None else next(model.parameters()).device
    batch = batch_to_device(batch, device)
    dtype = AUTOCAST_DTYPES[autocast_dtype]
    context = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    with context:
        embeddings = model.encode(normalize=normalize, **batch)  # (b, D)
    return embeddings.float().cpu()


@torch.no_grad()
def embed_batches(
    model: torch.nn.Module,
    processor: Any,
    texts: Sequence[str],
    images: Sequence[Any] | None = None,
    batch_size: int = 64,
    max_length: int = 256,
    autocast_dtype: str = "float32",
    device: torch.device | str | None = None,
    normalize: bool | None = None,
    feature_store: Any = None,
    image_root: str | None = None,
) -> torch.Tensor:
    """
    (len(texts), D) float32 embeddings, `model.encode` on fixed consecutive batches (same batches -> same bits).
    `images`: one reference per text (file path relative to `image_root`, PIL image, `datasets.Image` cell, key of
    `feature_store`, or None). The next batch is tokenised in a background thread during the forward (`prefetch`).
    """
    if autocast_dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast_dtype must be one of {list(AUTOCAST_DTYPES)}, got {autocast_dtype!r}")
    check_max_length(max_length)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    feat_dim = getattr(getattr(model, "config", None), "feat_dim", None)
    config = getattr(model, "config", None)
    build = JointEncoderInputBuilder(
        processor, max_length, feature_store, image_root, feat_dim,
        expected_features=getattr(config, "visual_features", None), n_images=getattr(config, "n_images", 1) or 1,
    )  # fmt: skip
    batches = (
        build(
            list(texts[start : start + batch_size]),
            None if images is None else list(images[start : start + batch_size]),
        )
        for start in range(0, len(texts), batch_size)
    )
    out = [forward_batch(model, batch, autocast_dtype, device, normalize) for batch in prefetch(batches)]
    return torch.cat(out) if out else torch.empty(0, 0)


__all__ = [
    "AUTOCAST_DTYPES",
    "STORAGE_DTYPES",
    "batch_to_device",
    "check_max_length",
    "check_model_location",
    "embed_batches",
    "forward_batch",
    "load_model_and_processor",
    "model_fingerprint",
    "prefetch",
]
