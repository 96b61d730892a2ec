"""The demo's figures (matplotlib, Agg backend: no display needed), written atomically."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence


def _figure_module():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str) -> None:
    from ..utils.io import atomic_path

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_training(log_history: Sequence[Mapping], path: str, untrained_mrr: float | None = None,
                  metric: str = "eval_mrr@10") -> None:
    """Training loss (left axis) and validation MRR@10 (right axis) against the step, from `trainer.state.log_history`."""
    plt = _figure_module()
    loss = [(row["step"], row["loss"]) for row in log_history if "loss" in row]
    mrr = [(row["step"], row[metric]) for row in log_history if metric in row]
    if untrained_mrr is not None:
        mrr = [(0, untrained_mrr)] + mrr
    figure, left = plt.subplots(figsize=(6.4, 3.6))
    if loss:
        left.plot(*zip(*loss), color="tab:blue", label="training loss (in-batch contrastive)")
    left.set_xlabel("training step")
    left.set_ylabel("loss", color="tab:blue")
    right = left.twinx()
    if mrr:
        right.plot(*zip(*mrr), "o-", color="tab:orange", label="validation MRR@10")
    right.set_ylabel("validation MRR@10", color="tab:orange")
    right.set_ylim(0, 1)
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    right.legend(handles=handles, loc="center right", fontsize=8)
    _save(figure, path)
    plt.close(figure)


def plot_query_sheet(queries: Sequence[Mapping], run: Mapping[str, Mapping[str, float]], kb: Mapping[str, Mapping],
                     path: str, top: int = 3) -> None:
    """One row per query: its image and question, then its `top` retrieved passages (image + text), the relevant
    ones framed in green, the others in red; a legend and a caption say so (and what `#rank (score)` is)."""
    plt = _figure_module()
    figure, axes = plt.subplots(len(queries), top + 1, figsize=(2.4 * (top + 1), 2.3 * len(queries)), squeeze=False)
    for row, query in enumerate(queries):
        axis = axes[row, 0]
        axis.imshow(query["image"])
        axis.set_title("\n".join(textwrap.wrap(query["question"], 26)), fontsize=8)
        ranked = sorted(run.get(query["id"], {}).items(), key=lambda item: -item[1])[:top]
        for column in range(top):
            axis = axes[row, column + 1]
            if column < len(ranked):
                passage_id, score = ranked[column]
                passage = kb[passage_id]
                relevant = passage_id in query["positive_ids"]
                axis.imshow(passage["image"])
                axis.set_title("\n".join(textwrap.wrap(f"#{column + 1} ({score:.2f}) {passage['text']}", 30)),
                               fontsize=7, color="darkgreen" if relevant else "darkred")
                for spine in axis.spines.values():
                    spine.set_edgecolor("green" if relevant else "red")
                    spine.set_linewidth(3)
        for axis in axes[row]:
            axis.set_xticks([])
            axis.set_yticks([])
    axes[0, 0].set_ylabel("query", fontsize=8)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    from matplotlib.patches import Patch

    figure.legend(
        handles=[Patch(facecolor="white", edgecolor="green", linewidth=3, label="relevant passage (its qrels entry)"),
                 Patch(facecolor="white", edgecolor="red", linewidth=3, label="not relevant")],
        loc="lower center", ncol=2, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.015),
    )  # fmt: skip
    figure.text(
        0.5, 0.0, f"Each row: a test query (its image and question), then its top {top} passages with their KB image. "
        "Above a passage: #rank (score: the model's similarity) and its text.", ha="center", va="bottom", fontsize=8,
    )  # fmt: skip
    _save(figure, path)
    plt.close(figure)


__all__ = ["plot_query_sheet", "plot_training"]
