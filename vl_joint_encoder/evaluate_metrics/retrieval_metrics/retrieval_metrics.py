"""`evaluate` metric: MRR@k, Precision@k, Recall@k, Hit rate@k, nDCG@k, MAP@k of ranked lists, computed by ranx.

Load offline from this folder: `evaluate.load("path/to/retrieval_metrics")`. One import per line: `evaluate` parses
them with a regex to find the script's dependencies.
"""

import datasets
import evaluate

from vl_joint_encoder.retrieval.metrics import DEFAULT_METRICS
from vl_joint_encoder.retrieval.metrics import evaluate as evaluate_run


_DESCRIPTION = """
Retrieval metrics of one ranked list of passage ids per query against that query's relevant passage ids (binary
relevance). Computed by ranx through `vl_joint_encoder.retrieval.metrics` (`ranx.evaluate(..., make_comparable=True)`,
Bassani, ECIR 2022): a query without relevant passage scores 0 and is counted in the mean.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[str]]`): for each query, retrieved passage ids, best first.
    references (`list[list[str]]`): for each query, the ids of its relevant passages (may be empty).
    metrics (`list[str]`, optional): ranx-style names, e.g. `["mrr@10", "precision@1", "ndcg@10"]`.
Returns:
    `dict[str, float]`: one value per metric.
Example:
    >>> metric = evaluate.load("vl_joint_encoder/evaluate_metrics/retrieval_metrics")
    >>> metric.compute(predictions=[["a", "b"], ["c"]], references=[["b"], ["x"]], metrics=["mrr@10"])
    {'mrr@10': 0.25}
"""

_CITATION = """
@inproceedings{ranx,
  author = {Elias Bassani}, title = {ranx: A Blazing-Fast Python Library for Ranking Evaluation and Comparison},
  booktitle = {ECIR}, year = {2022}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://github.com/AmenRa/ranx"],
        )

    def _compute(self, predictions, references, metrics=None):
        if len(predictions) != len(references):
            raise ValueError(
                f"{len(predictions)} ranked lists but {len(references)} reference lists: one each per query"
            )
        run, qrels = {}, {}
        for index, (ranked, relevant) in enumerate(zip(predictions, references)):
            if len(set(ranked)) != len(ranked):
                raise ValueError(f"query {index}: the ranked list repeats passage ids; each passage appears once")
            query_id = f"{index:09d}"
            run[query_id] = {passage: float(len(ranked) - rank) for rank, passage in enumerate(ranked)}
            qrels[query_id] = {passage: 1 for passage in relevant}
        return evaluate_run(qrels, run, list(metrics or DEFAULT_METRICS))
