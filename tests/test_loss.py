"""InBatchContrastiveLoss against hand computations (math module, no torch in the reference)."""

import math

import pytest
import torch

from vl_joint_encoder import JointEncoderConfig
from vl_joint_encoder.training.loss import InBatchContrastiveLoss


# 3 queries, 6 passages in 2-D so every score can be checked by eye.
QUERIES = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
# p0 = q0's positive, p1 = q0's hard negative, p2 = q1's positive, p3 = q1's hard negative,
# p4 = q2's positive, p5 = the same passage as p0 (key 10) appearing again as q2's hard negative.
PASSAGES = [[2.0, 0.0], [0.5, 0.5], [0.0, 1.0], [1.0, -1.0], [1.0, 2.0], [2.0, 0.0]]
POSITIVE_INDEX = [0, 2, 4]
PASSAGE_KEYS = [10, 11, 12, 13, 14, 10]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def cosine(a, b):
    return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))


def hand_loss(sim, scale, masked):
    """masked[i] = set of passage columns removed from query i's softmax."""
    nlls, ranks = [], []
    for i, query in enumerate(QUERIES):
        scores = {j: scale * sim(query, p) for j, p in enumerate(PASSAGES) if j not in masked[i]}
        positive = scores[POSITIVE_INDEX[i]]
        log_z = math.log(sum(math.exp(s) for s in scores.values()))
        nlls.append(log_z - positive)
        ranks.append(1 + sum(1 for j, s in scores.items() if j != POSITIVE_INDEX[i] and s >= positive))
    return (
        sum(nlls) / len(nlls),
        sum(r == 1 for r in ranks) / len(ranks),
        sum(1 / r for r in ranks) / len(ranks),
        nlls,
    )


def run(loss_fn, passage_keys=None, query_positive_keys=None, **kwargs):
    return loss_fn(
        torch.tensor(QUERIES, dtype=torch.float64),
        torch.tensor(PASSAGES, dtype=torch.float64),
        torch.tensor(POSITIVE_INDEX),
        None if passage_keys is None else torch.tensor(passage_keys),
        None if query_positive_keys is None else torch.tensor(query_positive_keys),
        **kwargs,
    )


def assert_parts(out, expected):
    loss, accuracy, mrr, _ = expected
    assert out["loss"].item() == pytest.approx(loss, abs=1e-10)
    assert out["accuracy"].item() == pytest.approx(accuracy, abs=1e-7)
    assert out["mrr"].item() == pytest.approx(mrr, abs=1e-7)


@pytest.mark.parametrize("similarity,sim,scale", [("dot", dot, 1.0), ("dot", dot, 3.0), ("cosine", cosine, 20.0)])
def test_no_masking_equals_hand_computation(similarity, sim, scale):
    out = run(InBatchContrastiveLoss(similarity, scale))
    expected = hand_loss(sim, scale, masked=[set(), set(), set()])
    assert_parts(out, expected)
    # by hand for q1 (dot, scale 1): scores [0, 1, 2, -2, 4, 0], positive p2 = 2 -> rank 2 (p4 scores 4)
    if similarity == "dot" and scale == 1.0:
        q1 = math.log(sum(math.exp(s) for s in [0, 1, 2, -2, 4, 0])) - 2
        assert expected[3][1] == pytest.approx(q1)


def test_duplicate_of_positive_is_not_a_negative():
    # passage_keys only: p5 is a copy of q0's positive p0 -> removed from q0's softmax only.
    out = run(InBatchContrastiveLoss("dot", 1.0), passage_keys=PASSAGE_KEYS)
    expected = hand_loss(dot, 1.0, masked=[{5}, set(), set()])
    assert_parts(out, expected)
    # q0 (dot): scores [2, .5, 0, 1, 1, 2]; without masking p5 ties the positive: rank 2 (pessimistic ties), with it 1
    assert expected[1] == pytest.approx(2 / 3)  # q0 and q2 first, q1 second
    unmasked = hand_loss(dot, 1.0, masked=[set(), set(), set()])
    assert unmasked[1] == pytest.approx(1 / 3)
    assert out["loss"].item() < unmasked[0]


def test_query_positive_keys_mask_other_queries_positives():
    # q1 is also answered by passage 14 (q2's positive, p4) and q2 by 10 (p0 and its copy p5); -1 pads.
    query_positive_keys = [[10, -1], [12, 14], [14, 10]]
    out = run(InBatchContrastiveLoss("cosine", 5.0), PASSAGE_KEYS, query_positive_keys)
    expected = hand_loss(cosine, 5.0, masked=[{5}, {4}, {0, 5}])
    assert_parts(out, expected)


def test_own_positive_column_is_never_masked():
    # q0's positive keys include its own positive's key: the positive column stays, its copy goes.
    out = run(InBatchContrastiveLoss("dot", 2.0), PASSAGE_KEYS, [[10, 11], [-1, -1], [-1, -1]])
    expected = hand_loss(dot, 2.0, masked=[{1, 5}, set(), set()])
    assert_parts(out, expected)
    assert math.isfinite(out["loss"].item())


def test_num_items_in_batch_sums_then_divides():
    loss_fn = InBatchContrastiveLoss("dot", 1.0)
    nlls = hand_loss(dot, 1.0, masked=[set(), set(), set()])[3]
    out = run(loss_fn, num_items_in_batch=7)
    assert out["loss"].item() == pytest.approx(sum(nlls) / 7, abs=1e-10)


def test_gradient_matches_softmax_formula():
    # d loss / d scores = (softmax - onehot) / Q; with dot and scale s, d loss / d q_i = s * sum_j g_ij p_j.
    queries = torch.tensor(QUERIES, dtype=torch.float64, requires_grad=True)
    passages = torch.tensor(PASSAGES, dtype=torch.float64)
    InBatchContrastiveLoss("dot", 2.0)(queries, passages, torch.tensor(POSITIVE_INDEX))["loss"].backward()
    for i, query in enumerate(QUERIES):
        scores = [2.0 * dot(query, p) for p in PASSAGES]
        z = sum(math.exp(s) for s in scores)
        weights = [math.exp(s) / z - (j == POSITIVE_INDEX[i]) for j, s in enumerate(scores)]
        expected = [2.0 * sum(w * p[d] for w, p in zip(weights, PASSAGES)) / len(QUERIES) for d in range(2)]
        assert queries.grad[i].tolist() == pytest.approx(expected, abs=1e-10)


def test_from_config_uses_similarity_and_logit_scale():
    config = JointEncoderConfig(similarity="dot", logit_scale=7.0)
    loss_fn = InBatchContrastiveLoss.from_config(config)
    assert (loss_fn.similarity, loss_fn.scale) == ("dot", 7.0)
    assert_parts(run(loss_fn), hand_loss(dot, 7.0, masked=[set(), set(), set()]))


def test_collapsed_encoder_gets_zero_accuracy():
    out = InBatchContrastiveLoss("dot", 1.0)(torch.ones(4, 3), torch.ones(8, 3), torch.tensor([0, 2, 4, 6]))
    assert out["accuracy"].item() == 0.0
    assert out["mrr"].item() == pytest.approx(1 / 8)
    assert out["loss"].item() == pytest.approx(math.log(8))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(queries=torch.zeros(2, 3, 4)), "2-D"),
        (dict(passages=torch.zeros(6, 3)), "same size"),
        (dict(positive_index=torch.tensor([0, 2])), r"shape \(num_queries,\)"),
        (dict(positive_index=torch.tensor([0.0, 2.0, 4.0])), "long tensor"),
        (dict(positive_index=torch.tensor([0, 2, 6])), "index this batch's 6 passages"),
        (dict(passage_keys=torch.tensor([1, 2, 3])), "passage_keys must be"),
        (dict(passage_keys=torch.tensor([0, 1, 2, 3, 4, -1])), "non-negative"),
        (dict(query_positive_keys=torch.tensor([[1], [2], [3]])), "needs passage_keys"),
        (dict(passage_keys=torch.arange(6), query_positive_keys=torch.tensor([[1], [2]])), "query_positive_keys"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, match):
    inputs = dict(
        queries=torch.tensor(QUERIES),
        passages=torch.tensor(PASSAGES),
        positive_index=torch.tensor(POSITIVE_INDEX),
        passage_keys=None,
        query_positive_keys=None,
    )
    inputs.update(kwargs)
    with pytest.raises(ValueError, match=match):
        InBatchContrastiveLoss("dot", 1.0)(*inputs.values())


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="similarity"):
        InBatchContrastiveLoss("l2")
    with pytest.raises(ValueError, match="scale"):
        InBatchContrastiveLoss("dot", 0.0)


def test_half_precision_embeddings_give_an_fp32_loss():
    """Under autocast / bf16 models the softmax runs in fp32: equal to the fp64 loss of the same bf16 values."""
    queries = torch.tensor(QUERIES, dtype=torch.bfloat16)
    passages = torch.tensor(PASSAGES, dtype=torch.bfloat16)  # these values are exact in bf16
    out = InBatchContrastiveLoss("dot", 3.0)(queries, passages, torch.tensor(POSITIVE_INDEX))
    assert out["loss"].dtype == torch.float32
    assert out["loss"].item() == pytest.approx(hand_loss(dot, 3.0, masked=[set(), set(), set()])[0], rel=1e-2)
