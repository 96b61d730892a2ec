"""`vl-joint-encoder data-report`: know the data before training (tokens, truncation, unknown words, images, ids)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from . import command_main


@dataclass
class DataReportArguments:
    model: str = field(metadata={"help": "model (or tokenizer) folder whose tokenizer to use"})
    queries: list[str] = field(metadata={"help": "query files or a save_to_disk folder"})
    kb: list[str] = field(metadata={"help": "KB files or a save_to_disk folder"})
    columns: Literal["generic", "viquae"] = field(default="generic", metadata={"help": "column preset"})
    viquae_positives: str = field(default="provenance_indices", metadata={"help": "viquae preset: positives column"})
    viquae_negatives: str = field(default="BM25_irrelevant_indices", metadata={"help": "viquae preset: negatives"})
    query_max_length: int = field(default=64, metadata={"help": "max query tokens"})
    passage_max_length: int = field(default=256, metadata={"help": "max passage tokens"})
    image_root: str | None = field(default=None, metadata={"help": "folder that relative image paths are relative to"})
    feature_store: str | None = field(default=None, metadata={"help": "precomputed features (.npz / .safetensors ...)"})
    max_passages: int = field(default=100_000, metadata={"help": "sample this many passages for token statistics"})
    on_missing_positive: Literal["skip", "error"] = field(
        default="skip", metadata={"help": "as train's option: with error, queries without a positive are a refusal"}
    )
    json: str | None = field(default=None, metadata={"help": "also write the report as JSON here"})
    strict: bool = field(default=False, metadata={"help": "exit status 1 when train would refuse the data"})


def report(args: DataReportArguments) -> int:
    from transformers import AutoTokenizer

    from ..data.report import data_report, format_report
    from ..data.tables import ColumnMapping
    from ..utils.io import write_json

    tokenizer_dir = args.model
    if os.path.isdir(os.path.join(args.model, "query_encoder")) and not os.path.isfile(
        os.path.join(args.model, "tokenizer_config.json")
    ):
        tokenizer_dir = os.path.join(args.model, "query_encoder")
    if not os.path.isdir(tokenizer_dir):
        from ..retrieval.embed import check_model_location

        check_model_location(tokenizer_dir, "--model")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    mapping = (
        ColumnMapping.viquae(args.viquae_positives, args.viquae_negatives) if args.columns == "viquae" else ColumnMapping()
    )
    result = data_report(
        args.queries if len(args.queries) > 1 else args.queries[0],
        args.kb if len(args.kb) > 1 else args.kb[0],
        tokenizer, mapping, args.query_max_length, args.passage_max_length, args.feature_store, args.image_root,
        args.max_passages, on_missing_positive=args.on_missing_positive,
    )  # fmt: skip
    print(format_report(result))
    if args.json:
        write_json(args.json, result)
    return 1 if args.strict and result["refusals"] else 0


main = command_main(
    "vl-joint-encoder data-report", [DataReportArguments], report, "Describe queries and KB before training."
)
