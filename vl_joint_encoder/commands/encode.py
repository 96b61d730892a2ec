"""`vl-joint-encoder encode`: encode a knowledge base into embedding shards (resumable; several processes with
`accelerate launch ... -m vl_joint_encoder encode ...`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from . import command_main


DTYPES = Literal["float32", "float16", "bfloat16"]


@dataclass
class EncodeArguments:
    model: str = field(metadata={"help": "saved JointEncoderModel or separate-towers folder"})
    kb: str = field(metadata={"help": "KB: JSONL / Parquet file or save_to_disk folder (id, text, image)"})
    output_dir: str = field(metadata={"help": "where the shards are written (resumed if it holds this encoding)"})
    processor: str | None = field(
        default=None, metadata={"help": "tokenizer / processor folder (default: the model's)"}
    )
    batch_size: int = field(default=64, metadata={"help": "passages per forward pass"})
    shard_size: int = field(default=10_000, metadata={"help": "passages per shard file"})
    max_length: int = field(default=256, metadata={"help": "max passage tokens"})
    no_sort_by_length: bool = field(default=False, metadata={"help": "keep KB order instead of longest first"})
    autocast_dtype: DTYPES = field(default="float32", metadata={"help": "autocast on GPU (float16 / bfloat16)"})
    storage_dtype: DTYPES = field(default="float32", metadata={"help": "dtype of the stored embeddings"})
    id_column: str = field(default="id", metadata={"help": "KB id column"})
    text_column: str = field(default="text", metadata={"help": "KB text column"})
    image_column: str = field(default="image", metadata={"help": "KB image column (optional)"})
    feature_store: str | None = field(
        default=None,
        metadata={
            "help": "precomputed visual features (.npz / .safetensors / .h5, or an extract-features folder); "
            "image cells that are its keys use them"
        },
    )
    image_root: str | None = field(default=None, metadata={"help": "folder that relative image paths are relative to"})
    cpu: bool = field(default=False, metadata={"help": "run on CPU even if a GPU is present"})


def encode(args: EncodeArguments) -> int:
    from accelerate import PartialState

    from ..retrieval.embed import load_model_and_processor
    from ..retrieval.encode import encode_knowledge_base

    state = PartialState(cpu=args.cpu)
    model, processor = load_model_and_processor(args.model, tower="passage_encoder", processor_path=args.processor)
    model.to(state.device)
    manifest = encode_knowledge_base(
        model,
        processor,
        args.kb,
        args.output_dir,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        max_length=args.max_length,
        sort_by_length=not args.no_sort_by_length,
        autocast_dtype=args.autocast_dtype,
        storage_dtype=args.storage_dtype,
        id_column=args.id_column,
        text_column=args.text_column,
        image_column=args.image_column,
        model_name=args.model,
        state=state,
        feature_store=args.feature_store,
        image_root=args.image_root,
        require_feature_store_match=True,
    )
    if manifest is not None:
        print(
            f"encoded {manifest['count']} passages ({manifest['dim']}-d, {manifest['similarity']}) into {args.output_dir}"
        )
    return 0


main = command_main(
    "vl-joint-encoder encode",
    [EncodeArguments],
    encode,
    "Encode a knowledge base into embedding shards (resumable; several processes with accelerate launch).",
)
