"""`vl-joint-encoder qrels`: the qrels of a queries file, from its positives, for `vl-joint-encoder evaluate`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from . import command_main


@dataclass
class QrelsArguments:
    queries: list[str] = field(metadata={"help": "queries file(s) or a save_to_disk folder, with their positives"})
    kb: list[str] = field(metadata={"help": "the KB the positives point into (ids are checked against it)"})
    output: str = field(metadata={"help": "qrels file to write: ranx JSON {query: {passage: 1}} (.json)"})
    columns: Literal["generic", "viquae"] = field(default="generic", metadata={"help": "column preset"})
    viquae_positives: str = field(
        default="provenance_indices", metadata={"help": "viquae preset: the positives column"}
    )
    id_column: str | None = field(default=None, metadata={"help": "query id column (default: the preset's)"})
    positive_ids_column: str | None = field(
        default=None, metadata={"help": "positives column (default: the preset's, positive_ids)"}
    )
    kb_id_column: str | None = field(default=None, metadata={"help": "KB id column (default: the preset's)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --output"})

    def __post_init__(self):
        if not self.output.endswith(".json"):
            raise ValueError(f"--output {self.output!r}: qrels are written as ranx JSON; give a .json path")
        if os.path.exists(self.output) and not self.overwrite:
            raise ValueError(f"--output {self.output} exists: pass --overwrite, or another path")


def qrels(args: QrelsArguments) -> int:
    from ..data.tables import ColumnMapping, qrels_from_queries, read_knowledge_base, read_queries
    from ..utils.io import write_json

    preset = ColumnMapping.viquae(args.viquae_positives, None) if args.columns == "viquae" else ColumnMapping()
    mapping = preset.with_overrides(
        query_id=args.id_column, positive_ids=args.positive_ids_column, passage_id=args.kb_id_column
    )
    queries = read_queries(args.queries if len(args.queries) > 1 else args.queries[0], mapping, need_positives=True)
    kb = read_knowledge_base(args.kb if len(args.kb) > 1 else args.kb[0], mapping, check_texts=False)
    relevant = qrels_from_queries(queries, kb)
    kept = {query: passages for query, passages in relevant.items() if passages}
    if not kept:
        raise ValueError(f"no query of {', '.join(args.queries)} has a positive in column {mapping.positive_ids!r}")
    write_json(args.output, kept)
    n_pairs = sum(len(passages) for passages in kept.values())
    print(f"qrels of {len(kept)} queries ({n_pairs} relevant passages) -> {args.output}")
    if len(kept) < len(relevant):
        print(f"{len(relevant) - len(kept)} queries without a positive were left out: they cannot be scored")
    return 0


main = command_main(
    "vl-joint-encoder qrels",
    [QrelsArguments],
    qrels,
    "Qrels from the positives of a queries file (positive_ids, or a ViQuAE provenance column), checked against the "
    "KB, for `vl-joint-encoder evaluate`.",
)
