"""In-batch contrastive loss (DPR-style NLL over in-batch and hard negatives) for training the joint encoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling_joint_encoder import similarity_scores
from . import distributed


class InBatchContrastiveLoss(nn.Module):
    """
    Negative log-likelihood of each query's positive passage under a softmax over ALL passages of the (global) batch:
    its positive, its hard negatives, and every other query's passages (positives and hard negatives), as in DPR
    (Karpukhin et al. 2020) and InfoNCE (van den Oord et al. 2018); sentence-transformers calls it
    MultipleNegativesRankingLoss.

        loss = mean_i [ -log softmax_j( scale * sim(q_i, p_j) )[positive_index_i] ]

    with `sim` the model's similarity (`dot` or `cosine`) computed by
    `vl_joint_encoder.modeling_joint_encoder.similarity_scores`, the very function search uses, and
    `scale = 1 / temperature` (`config.logit_scale`, 20 = temperature 0.05 by default).

    False negatives: a passage whose key (`passage_keys`) is among a query's positive keys (`query_positive_keys`)
    is removed from that query's softmax (score -inf), except at the query's own positive column. This covers the
    same passage appearing twice in a batch, and a passage that is positive for two queries. Without
    `query_positive_keys`, only the copies of the query's positive (same key) are removed.

    Across processes (`gather_across_processes`, default: on when `torch.distributed` runs more than one process):
    passages, queries, labels and keys are gathered from every rank, passage embeddings and query embeddings WITH
    gradients (`vl_joint_encoder.distributed.gather_with_grad`), and `positive_index` is shifted by the number of
    passages on the ranks before. Every rank then computes the loss of the whole global batch, so the returned values
    are the global ones on every rank, and after DDP's gradient averaging the parameter gradients equal those of one
    process encoding the concatenated batch (tested with a real 2-process `accelerate launch`). So do NOT multiply the
    loss by the number of processes (as the Trainer does for token-averaged losses): the gather's backward already
    supplies the factor that DDP's averaging removes.

    For batches larger than memory, compute embeddings with `vl_joint_encoder.grad_cache.grad_cache_step`
    (GradCache, Gao et al. 2021): same loss and gradients, memory of one chunk.

    Args:
        similarity (`str`, defaults to `"cosine"`): `"dot"` or `"cosine"`; must be the model's `config.similarity`.
        scale (`float`, defaults to 20.0): multiplies the similarities before the softmax (1 / temperature).
        gather_across_processes (`bool`, *optional*): gather negatives from every rank. `None` (default): on when
            the world size is > 1 at call time.

    Inputs (`forward`):
        query_embeddings (`(Q, D)` float): this rank's query embeddings (`pooler_output`).
        passage_embeddings (`(P, D)` float): this rank's passage embeddings (positives and hard negatives).
        positive_index (`(Q,)` long): row of each query's positive in `passage_embeddings` (this rank's numbering).
        passage_keys (`(P,)` int64, *optional*): an id per passage (non-negative; equal ids = same passage).
        query_positive_keys (`(Q, K)` int64, *optional*): keys of every passage relevant to each query, padded with
            -1. Needs `passage_keys`.
        num_items_in_batch (`int` or tensor, *optional*): when given, the loss is the SUM of the per-query NLL divided
            by it instead of the mean (the Trainer's gradient-accumulation semantics: the number of queries over all
            accumulated micro-batches, counted over the global batch when gathering).

    Returns:
        `dict` with `loss` (differentiable scalar), `accuracy` (share of queries whose positive is ranked first among
        the unmasked passages; ties count against the positive) and `mrr` (mean reciprocal rank of the positive),
        the last two detached.

    References:
        - Karpukhin et al. 2020, Dense Passage Retrieval for Open-Domain Question Answering,
          https://arxiv.org/abs/2004.04906
        - van den Oord et al. 2018, Representation Learning with Contrastive Predictive Coding (InfoNCE),
          https://arxiv.org/abs/1807.03748
        - Gao et al. 2021, Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup (GradCache),
          https://arxiv.org/abs/2101.06983

    Example:
        ```python
        loss_fn = InBatchContrastiveLoss.from_config(model.config)
        queries = model(**batch["query"]).pooler_output      # (Q, D)
        passages = model(**batch["passage"]).pooler_output   # (P, D), e.g. P = 2 Q: one positive + one hard negative
        out = loss_fn(queries, passages, batch["positive_index"], batch["passage_keys"], batch["query_positive_keys"])
        out["loss"].backward()
        ```
    """

    def __init__(self, similarity: str = "cosine", scale: float = 20.0, gather_across_processes: bool | None = None):
        super().__init__()
        if similarity not in ("dot", "cosine"):
            raise ValueError(f"similarity must be 'dot' or 'cosine' (the model's config.similarity), got {similarity!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale must be a positive number (1 / temperature, config.logit_scale), got {scale!r}")
        self.similarity = similarity
        self.scale = float(scale)
        self.gather_across_processes = gather_across_processes

    @classmethod
    def from_config(cls, config, **kwargs) -> InBatchContrastiveLoss:
        """The loss for a `JointEncoderConfig`: its `similarity` and `logit_scale` (so training and search agree)."""
        return cls(similarity=config.similarity, scale=config.logit_scale, **kwargs)

    def extra_repr(self) -> str:
        return f"similarity={self.similarity!r}, scale={self.scale}, gather_across_processes={self.gather_across_processes}"

    def forward(
        self,
        query_embeddings: torch.Tensor,
        passage_embeddings: torch.Tensor,
        positive_index: torch.Tensor,
        passage_keys: torch.Tensor | None = None,
        query_positive_keys: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        _check_inputs(query_embeddings, passage_embeddings, positive_index, passage_keys, query_positive_keys)
        gather = self.gather_across_processes
        if gather is None:
            gather = distributed.is_distributed()
        if gather and distributed.is_distributed():
            # shift labels by the passages of the ranks before this one, then gather everything (rank order)
            offset = distributed.rank_offset(distributed.gather_sizes(passage_embeddings))
            positive_index = distributed.gather_no_grad(positive_index + offset)  # (Q_global,)
            if passage_keys is not None:
                passage_keys = distributed.gather_no_grad(passage_keys)  # (P_global,)
            if query_positive_keys is not None:
                query_positive_keys = distributed.gather_no_grad(query_positive_keys, pad_value=-1)  # (Q_global, K)
            query_embeddings = distributed.gather_with_grad(query_embeddings)  # (Q_global, D)
            passage_embeddings = distributed.gather_with_grad(passage_embeddings)  # (P_global, D)

        scores = similarity_scores(query_embeddings, passage_embeddings, self.similarity, self.scale)  # (Q, P)
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()  # softmax in fp32 under autocast / half-precision models
        false_negatives = _false_negative_mask(positive_index, passage_keys, query_positive_keys)  # (Q, P) or None
        if false_negatives is not None:
            scores = scores.masked_fill(false_negatives, float("-inf"))  # (Q, P)

        nll = F.cross_entropy(scores, positive_index, reduction="none")  # (Q,)
        if num_items_in_batch is None:
            loss = nll.mean()
        else:
            loss = nll.sum() / num_items_in_batch

        with torch.no_grad():
            positive_scores = scores.gather(1, positive_index[:, None])  # (Q, 1)
            not_positive = torch.ones_like(scores, dtype=torch.bool)
            not_positive.scatter_(1, positive_index[:, None], False)  # (Q, P)
            # pessimistic ties: a negative scoring exactly as the positive ranks above it (a collapsed encoder gets 0)
            ranks = 1 + ((scores >= positive_scores) & not_positive).sum(dim=1)  # (Q,)
            accuracy = (ranks == 1).float().mean()
            mrr = (1.0 / ranks.float()).mean()
        return {"loss": loss, "accuracy": accuracy, "mrr": mrr}


def _false_negative_mask(
    positive_index: torch.Tensor, passage_keys: torch.Tensor | None, query_positive_keys: torch.Tensor | None
) -> torch.Tensor | None:
    """(Q, P) bool: passages that are positive for the query but are not its own positive column."""
    if passage_keys is None:
        return None
    if query_positive_keys is None:
        query_positive_keys = passage_keys[positive_index][:, None]  # (Q, 1): the key of each query's positive
    is_positive = (passage_keys[None, :, None] == query_positive_keys[:, None, :]).any(dim=2)  # (Q, P)
    own_column = F.one_hot(positive_index, num_classes=passage_keys.shape[0]).bool()  # (Q, P)
    return is_positive & ~own_column


def _check_inputs(queries, passages, positive_index, passage_keys, query_positive_keys) -> None:
    if queries.dim() != 2 or passages.dim() != 2:
        raise ValueError(
            f"query_embeddings and passage_embeddings must be 2-D (batch, dim), got shapes {tuple(queries.shape)} and "
            f"{tuple(passages.shape)}; pass `pooler_output`, not `last_hidden_state`"
        )
    if queries.shape[1] != passages.shape[1]:
        raise ValueError(
            f"query embeddings have dim {queries.shape[1]} but passage embeddings have dim {passages.shape[1]}; "
            "query and passage encoders must project to the same size (config.projection_dim)"
        )
    if positive_index.dtype != torch.long or positive_index.shape != (queries.shape[0],):
        raise ValueError(
            f"positive_index must be a long tensor of shape (num_queries,) = ({queries.shape[0]},), got "
            f"{positive_index.dtype} {tuple(positive_index.shape)}"
        )
    if positive_index.numel() and (positive_index.min() < 0 or positive_index.max() >= passages.shape[0]):
        raise ValueError(
            f"positive_index must index this batch's {passages.shape[0]} passages (0..{passages.shape[0] - 1}), got "
            f"values in [{positive_index.min().item()}, {positive_index.max().item()}]"
        )
    if passage_keys is not None:
        if passage_keys.shape != (passages.shape[0],) or passage_keys.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"passage_keys must be an integer tensor of shape (num_passages,) = ({passages.shape[0]},), got "
                f"{passage_keys.dtype} {tuple(passage_keys.shape)}"
            )
        if passage_keys.numel() and passage_keys.min() < 0:
            raise ValueError("passage_keys must be non-negative (-1 is the padding of query_positive_keys)")
    if query_positive_keys is not None:
        if passage_keys is None:
            raise ValueError("query_positive_keys needs passage_keys (the key of each passage column)")
        if query_positive_keys.dim() != 2 or query_positive_keys.shape[0] != queries.shape[0]:
            raise ValueError(
                f"query_positive_keys must have shape (num_queries, K) = ({queries.shape[0]}, K), padded with -1, got "
                f"{tuple(query_positive_keys.shape)}"
            )


__all__ = ["InBatchContrastiveLoss"]
