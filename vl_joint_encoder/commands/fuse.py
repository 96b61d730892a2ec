"""`vl-joint-encoder fuse`: late fusion of runs (ranx), weights given or tuned on validation runs and qrels.

    vl-joint-encoder fuse --runs bm25.test.json dense.test.json --fit_runs bm25.val.json dense.val.json \\
        --fit_qrels qrels.val.json --output fused.test.json          # gzmuv + wsum, weights tuned on mrr@100
    vl-joint-encoder fuse --runs a.json b.json --method rrf --norm none --params '{"k": 60}' --output rrf.json

Defaults are ViQuAE's authors' (`defmin`, global z-score `gzmuv`, weighted sum, weights in steps of 0.1 tuned for
`mrr@100`). Writes the fused run and `<output>.params.json` (method, norm, parameters, tuning results).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import command_main


@dataclass
class FuseArguments:
    runs: list[str] = field(metadata={"help": "runs to fuse (ranx JSON or TREC), in the order of --weights"})
    output: str = field(metadata={"help": "fused run (.json: ranx JSON, else TREC)"})
    method: str = field(default="wsum", metadata={"help": "ranx fusion method: wsum, rrf, combsum, ..."})
    norm: str = field(default="gzmuv", metadata={"help": "gzmuv (global z-score), a ranx norm (min-max, zmuv...) or none"})
    defmin: bool = field(default=True, metadata={"help": "a missing passage gets the run's minimum for the question"})
    weights: list[float] | None = field(default=None, metadata={"help": "wsum weights, one per run"})
    params: str | None = field(default=None, metadata={"help": "ranx parameters as JSON, e.g. '{\"k\": 60}'"})
    fit_runs: list[str] | None = field(default=None, metadata={"help": "validation runs (same systems, same order)"})
    fit_qrels: str | None = field(default=None, metadata={"help": "validation qrels the parameters are tuned on"})
    metric: str = field(default="mrr@100", metadata={"help": "metric the tuning maximises"})
    step: float = field(default=0.1, metadata={"help": "wsum weight grid step"})


def fuse(args: FuseArguments) -> int:
    import json

    from ..retrieval.fusion import fuse_runs, tune_fusion
    from ..retrieval.runs import load_qrels, load_run, write_run
    from ..utils.io import write_json

    norm = None if args.norm.lower() == "none" else args.norm
    params = json.loads(args.params) if args.params else {}
    if args.weights is not None:
        params["weights"] = list(args.weights)
    report = {}
    if args.fit_runs or args.fit_qrels:
        if not (args.fit_runs and args.fit_qrels):
            raise ValueError("tuning needs both --fit_runs and --fit_qrels")
        if len(args.fit_runs) != len(args.runs):
            raise ValueError(f"{len(args.fit_runs)} --fit_runs for {len(args.runs)} --runs: give the same systems")
        best, report = tune_fusion([load_run(p) for p in args.fit_runs], load_qrels(args.fit_qrels), args.method,
                                   norm, args.metric, args.defmin, args.step)  # fmt: skip
        params.update(best)
        print(f"tuned on {args.fit_qrels}: {best} ({args.metric} {max(report.values()):.4f})")
    fused = fuse_runs([load_run(p) for p in args.runs], args.method, norm, params, args.defmin)
    write_run(fused, args.output)
    write_json(args.output + ".params.json", {"runs": args.runs, "method": args.method, "norm": norm,
                                              "defmin": args.defmin, "params": params, "metric": args.metric,
                                              "tuning": report})  # fmt: skip
    print(f"fused {len(args.runs)} runs ({args.method}, {norm}, {params}) -> {args.output}")
    return 0


main = command_main("vl-joint-encoder fuse", [FuseArguments], fuse, "Late fusion of runs with ranx (tuned or given).")
