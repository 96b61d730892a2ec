"""A tiny joint encoder and a small multimodal contrastive batch, shared by the loss / GradCache / distributed tests
(imported by tests and by scripts that `accelerate launch` runs)."""

import torch
from torch import nn

from vl_joint_encoder import JointEncoderConfig, JointEncoderModel


def tiny_model(seed: int = 0, **overrides) -> JointEncoderModel:
    """hidden 32, 2 layers, 4 heads, vocab 99, with a projection so every parameter kind gets a gradient."""
    kwargs = dict(
        vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=20, feat_dim=16, n_images=2, dropout_rate=0.0, projection_dim=24,
        similarity="cosine", logit_scale=20.0,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = JointEncoderModel(JointEncoderConfig(**kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # typical-size random weights, so no path is an identity by accident
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model


def text_inputs(batch: int, length: int, generator: torch.Generator) -> dict:
    input_ids = torch.randint(2, 79, (batch, length), generator=generator)
    lengths = torch.randint(3, length + 1, (batch,), generator=generator)
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()  # (B, L) right padding
    input_ids = input_ids * attention_mask
    input_ids[torch.arange(batch), lengths - 1] = 1  # </s>
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def visual_inputs(batch: int, tokens: int, feat_dim: int, generator: torch.Generator) -> dict:
    xy1 = torch.rand(batch, tokens, 2, generator=generator) * 0.5
    xy2 = xy1 + torch.rand(batch, tokens, 2, generator=generator) * 0.5
    return {
        "visual_feats": torch.randn(batch, tokens, feat_dim, generator=generator),  # (B, V, feat_dim)
        "visual_pos": torch.cat([xy1, xy2], dim=-1),  # (B, V, 4)
    }


def contrastive_batch(num_queries: int = 6, hard_negatives: int = 1, seed: int = 0, passage_images: bool = True):
    """Queries = text + image regions; passages = text (+ image regions); 1 positive + n hard negatives per query.
    Passage 1 of query 0 is repeated as the hard negative of the last query (key collision), and query 1 also has
    query 0's positive as a relevant passage, so false-negative masking has work to do."""
    generator = torch.Generator().manual_seed(seed)
    group = 1 + hard_negatives
    num_passages = num_queries * group
    query = {**text_inputs(num_queries, 7, generator), **visual_inputs(num_queries, 4, 16, generator)}
    passage = text_inputs(num_passages, 9, generator)
    if passage_images:
        passage.update(visual_inputs(num_passages, 3, 16, generator))
    positive_index = torch.arange(num_queries) * group  # (Q,)
    passage_keys = torch.arange(num_passages) + 100  # (P,)
    passage_keys[-1] = passage_keys[0]
    for key in ("input_ids", "attention_mask", "visual_feats", "visual_pos"):
        if key in passage:
            passage[key][-1] = passage[key][0]
    query_positive_keys = torch.full((num_queries, 2), -1)  # (Q, 2)
    query_positive_keys[:, 0] = passage_keys[positive_index]
    query_positive_keys[1, 1] = passage_keys[0]
    return {
        "query": query,
        "passage": passage,
        "positive_index": positive_index,
        "passage_keys": passage_keys,
        "query_positive_keys": query_positive_keys,
    }


def slice_batch(batch: dict, start: int, stop: int, group: int) -> dict:
    """Queries start:stop with their passages (group per query), positive_index renumbered locally."""
    return {
        "query": {key: value[start:stop] for key, value in batch["query"].items()},
        "passage": {key: value[start * group : stop * group] for key, value in batch["passage"].items()},
        "positive_index": batch["positive_index"][start:stop] - start * group,
        "passage_keys": batch["passage_keys"][start * group : stop * group],
        "query_positive_keys": batch["query_positive_keys"][start:stop],
    }


class TwoTowers(nn.Module):
    """One module holding a query and a passage tower, encoding one side per call (`tower="query"|"passage"`): the
    layout of a bi-encoder wrapped by a single DDP module."""

    def __init__(self, query: nn.Module, passage: nn.Module):
        super().__init__()
        self.query = query
        self.passage = passage

    def forward(self, tower: str, **inputs):
        return getattr(self, tower)(**inputs)
