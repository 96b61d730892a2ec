"""`JointEncoderModel.forward` on bad inputs (issue 14, item 8): every one is a ValueError naming the argument, and a
property test over random inputs: either the output equals an independent computation, or a ValueError names the
argument at fault.

The independent computation is the functional VL-T5 encoder of `tests/reference_vl_t5.py` (no code shared with the
package) run on each batch row alone, with the row's masked visual tokens removed (masking a key is removing it from
every query's attention), followed by the pooling written by hand from the masks.
"""

import os

import numpy as np
import pytest
import torch
from test_modeling import build, reference

from vl_joint_encoder.utils.errors import DEBUG_ENV


ATOL = 1e-5
POOLINGS = ("mean", "text_mean", "visual_mean", "first")
VOCAB, FEAT_DIM = 99, 16  # tiny_config_kwargs


@pytest.fixture(scope="module")
def models():
    return {pooling: build(seed=60 + i, pooling=pooling, normalize=False) for i, pooling in enumerate(POOLINGS)}


def valid_inputs(rng, batch=2):
    length, tokens = int(rng.integers(3, 6)), int(rng.integers(1, 5))
    input_ids = torch.from_numpy(rng.integers(2, VOCAB - 20, (batch, length)))
    input_ids[:, -1] = 1  # </s>
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    padding = int(rng.integers(0, length - 1))
    if padding:
        input_ids[1, -padding:] = 0
        attention_mask[1, -padding:] = 0
    xy1 = torch.from_numpy(rng.random((batch, tokens, 2)) * 0.5).float()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "visual_feats": torch.from_numpy(rng.standard_normal((batch, tokens, FEAT_DIM))).float(),
        "visual_pos": torch.cat([xy1, xy1 + torch.from_numpy(rng.random((batch, tokens, 2)) * 0.5).float()], -1),
        "visual_attention_mask": torch.ones(batch, tokens, dtype=torch.long),
        "image_order_ids": torch.zeros(batch, tokens, dtype=torch.long),
        "object_order_ids": torch.arange(tokens).expand(batch, tokens).clone(),
    }


# each corruption: (name, function(inputs, rng) -> the arguments it makes invalid, empty when the inputs stay valid)
def _float_ids(x, rng):
    x["input_ids"] = x["input_ids"].float()
    return {"input_ids"}


def _list_ids(x, rng):
    x["input_ids"] = x["input_ids"].tolist()
    return {"input_ids"}


def _id_out_of_vocab(x, rng):
    x["input_ids"][0, 0] = VOCAB + int(rng.integers(0, 5))
    return {"input_ids"}


def _mask_key(x, rng):
    keys = [key for key in ("attention_mask", "visual_attention_mask") if x[key] is not None]
    return keys[int(rng.integers(0, len(keys)))]


def _mask_value(x, rng):
    key = _mask_key(x, rng)
    x[key] = x[key].float()
    x[key][0, 0] = float(rng.choice([2.0, 0.5, -1.0]))
    return {key}


def _mask_row_off(x, rng):
    key = _mask_key(x, rng)
    x[key][1] = 0  # row 1: _mask_value's bad value is in row 0
    return set()  # valid or not depending on the pooling: decided by `pooled_sets`


def _mask_as_bool_or_float(x, rng):
    key = _mask_key(x, rng)
    x[key] = x[key].bool() if rng.random() < 0.5 else x[key].float()
    return set()


def _nan_feats(x, rng):
    x["visual_feats"][int(rng.integers(0, 2)), 0, int(rng.integers(0, FEAT_DIM))] = float(
        rng.choice([np.nan, np.inf, -np.inf])
    )
    return {"visual_feats"}


def _nan_boxes(x, rng):
    x["visual_pos"][0, -1, int(rng.integers(0, 4))] = float(rng.choice([np.nan, np.inf]))
    return {"visual_pos"}


def _wrong_feat_dim(x, rng):
    x["visual_feats"] = x["visual_feats"][..., :-1]
    return {"visual_feats"}


def _integer_feats(x, rng):
    x["visual_feats"] = x["visual_feats"].long()
    return {"visual_feats"}


def _wrong_box_dim(x, rng):
    x["visual_pos"] = x["visual_pos"][..., :3]
    return {"visual_pos"}


def _no_visual(x, rng):
    for key in ("visual_feats", "visual_pos", "visual_attention_mask", "image_order_ids", "object_order_ids"):
        x[key] = None
    return set()


def _no_text(x, rng):
    x["input_ids"] = x["attention_mask"] = None
    return set()


STRUCTURAL = [_no_visual, _no_text]  # applied first: they remove arguments
NEEDS_TEXT = [_float_ids, _list_ids, _id_out_of_vocab]
NEEDS_VISUAL = [_nan_feats, _nan_boxes, _wrong_feat_dim, _integer_feats, _wrong_box_dim]
# _mask_value last: a later bool / float cast of the mask would undo its bad value
CORRUPTIONS = STRUCTURAL + NEEDS_TEXT + NEEDS_VISUAL + [_mask_row_off, _mask_as_bool_or_float, _mask_value]


def pooled_sets(x, pooling):
    """Per row: the (text positions, visual positions) the pooling averages, from the masks (None: nothing)."""
    text = x["attention_mask"].bool() if x["input_ids"] is not None else None
    visual = x["visual_attention_mask"].bool() if x["visual_feats"] is not None else None
    rows = []
    for r in range(2):
        t = text[r].nonzero().flatten().tolist() if text is not None else []
        v = visual[r].nonzero().flatten().tolist() if visual is not None else []
        if pooling == "first":
            first_unmasked = bool(text[r, 0]) if text is not None else bool(visual[r, 0])
            rows.append(([0], []) if text is not None and first_unmasked else ([], [0]) if first_unmasked else None)
            continue
        if pooling == "text_mean":
            v = []
        if pooling == "visual_mean":
            t = []
        rows.append((t, v) if t or v else None)
    return rows


def independent(model, x, pooling):
    """(per-row hidden states at the unmasked positions, per-row pooled vector) from the functional reference."""
    hidden, pooled = [], []
    if x["visual_feats"] is None or bool(x["visual_attention_mask"].bool().all()):  # one batched call suffices
        kwargs = {k: x[k] for k in ("input_ids", "visual_feats", "visual_pos", "image_order_ids", "object_order_ids")}
        if x["input_ids"] is not None:
            kwargs["attention_mask"] = x["attention_mask"].float()
        h = reference(model, **kwargs)
        length = x["input_ids"].shape[1] if x["input_ids"] is not None else 0
        for r, (text_positions, visual_positions) in enumerate(pooled_sets(x, pooling)):
            hidden.append((list(range(h.shape[1])), h[r]))
            rows = text_positions + [length + v for v in visual_positions]
            pooled.append(h[r, rows].mean(0) if pooling != "first" else h[r, rows[0]])
        return hidden, pooled
    for r, chosen in enumerate(pooled_sets(x, pooling)):
        kwargs = {}
        length = 0
        if x["input_ids"] is not None:
            length = x["input_ids"].shape[1]
            kwargs.update(input_ids=x["input_ids"][r : r + 1], attention_mask=x["attention_mask"][r : r + 1].float())
        kept = []
        if x["visual_feats"] is not None:
            kept = x["visual_attention_mask"][r].bool().nonzero().flatten().tolist()
            if kept:
                kwargs.update(
                    visual_feats=x["visual_feats"][r : r + 1, kept],
                    visual_pos=x["visual_pos"][r : r + 1, kept],
                    image_order_ids=x["image_order_ids"][r : r + 1, kept],
                    object_order_ids=x["object_order_ids"][r : r + 1, kept],
                )
        h = reference(model, **kwargs)[0]  # (length + len(kept), d)
        hidden.append((list(range(length)) + [length + k for k in kept], h))
        text_positions, visual_positions = chosen
        rows = text_positions + [length + kept.index(v) for v in visual_positions]
        pooled.append(h[rows].mean(0) if pooling != "first" else h[rows[0]])
    return hidden, pooled


def test_random_forward_inputs_give_the_reference_result_or_a_value_error_naming_the_argument(models):
    rng = np.random.default_rng(14)
    outcomes = {"equal": 0, "refused": 0}
    for case in range(200):
        pooling = POOLINGS[case % len(POOLINGS)]
        x = valid_inputs(rng)
        bad = set()
        chosen = sorted(rng.choice(len(CORRUPTIONS), size=int(rng.integers(0, 3)), replace=False))
        for corruption in (CORRUPTIONS[i] for i in chosen):
            if corruption in STRUCTURAL and (x["visual_feats"] is None or x["input_ids"] is None):
                continue  # removing both text and visual inputs: no input at all (another test)
            if (corruption in NEEDS_TEXT and x["input_ids"] is None) or (
                corruption in NEEDS_VISUAL and x["visual_feats"] is None
            ):
                continue
            bad |= corruption(x, rng)
        if not bad and None in pooled_sets(x, pooling):
            bad = {"pooling"}
        model = models[pooling]
        try:
            with torch.no_grad():
                out = model(**x)
        except ValueError as error:
            assert bad, f"case {case} ({pooling}): valid inputs refused: {error}"
            assert any(name in str(error) for name in bad), f"case {case}: {error!r} names none of {bad}"
            outcomes["refused"] += 1
            continue
        assert not bad, f"case {case} ({pooling}): {bad} accepted"
        hidden, pooled = independent(model, x, pooling)
        for r, (positions, expected) in enumerate(hidden):
            torch.testing.assert_close(out.last_hidden_state[r, positions], expected, atol=ATOL, rtol=0)
            torch.testing.assert_close(out.pooler_output[r], pooled[r], atol=ATOL, rtol=0)
        outcomes["equal"] += 1
    assert outcomes["equal"] >= 50 and outcomes["refused"] >= 50, outcomes  # both branches are exercised


# ------------------------------------------------------------------------------------------ the cases
@torch.no_grad()
@pytest.mark.parametrize(
    "argument, corrupt",
    [
        ("visual_feats", lambda x: x["visual_feats"].__setitem__((0, 0, 0), float("nan"))),
        ("visual_feats", lambda x: x["visual_feats"].__setitem__((1, 0, 3), float("inf"))),
        ("visual_pos", lambda x: x["visual_pos"].__setitem__((0, 0, 0), float("nan"))),
        ("visual_pos", lambda x: x["visual_pos"].__setitem__((0, 0, 1), float("-inf"))),
        ("attention_mask", lambda x: x["attention_mask"].__setitem__((0, 0), 2)),
        ("visual_attention_mask", lambda x: x.update(visual_attention_mask=x["visual_attention_mask"] * 0.5)),
        ("input_ids", lambda x: x.update(input_ids=x["input_ids"].float())),
        ("input_ids", lambda x: x.update(input_ids=x["input_ids"].tolist())),
        ("attention_mask", lambda x: x.update(attention_mask=x["attention_mask"].tolist())),
    ],
)
def test_each_bad_argument_is_a_value_error_naming_it(models, argument, corrupt):
    x = valid_inputs(np.random.default_rng(1))
    corrupt(x)
    with pytest.raises(ValueError, match=argument):
        models["mean"](**x)


@torch.no_grad()
def test_an_empty_pooling_set_is_an_error_naming_the_pooling_and_the_mask(models):
    rng = np.random.default_rng(2)
    x = valid_inputs(rng)
    x["attention_mask"][1] = 0
    x["visual_attention_mask"][1] = 0
    with pytest.raises(ValueError, match=r"pooling 'mean' averages over no token in batch row\(s\) \[1\].*mask"):
        models["mean"](**x)
    x = valid_inputs(rng)
    with pytest.raises(ValueError, match=r"pooling 'text_mean' .*no unmasked text token.*no text"):
        models["text_mean"](**{**x, "input_ids": None, "attention_mask": None})
    with pytest.raises(ValueError, match=r"pooling 'visual_mean' .*visual"):
        models["visual_mean"](input_ids=x["input_ids"], attention_mask=x["attention_mask"])
    x["attention_mask"][0, 0] = 0  # left padding: the first token is masked
    with pytest.raises(ValueError, match=r"pooling 'first' takes the first token, but it is masked .* row\(s\) \[0\]"):
        models["first"](**x)
    # what was silently wrong before: the zero vector (mean) and a padding token's state (first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@torch.no_grad()
def test_gpu_values_are_checked_only_under_the_debug_switch(models, monkeypatch):
    model = models["mean"].cuda()
    x = valid_inputs(np.random.default_rng(3))
    x["visual_feats"][0, 0, 0] = float("nan")
    x = {k: v.cuda() for k, v in x.items()}
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert torch.isnan(model(**x).pooler_output[0]).any()  # no device synchronisation by default
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="visual_feats holds NaN"):
        model(**x)
    model.cpu()


def test_the_debug_switch_is_the_package_one():
    from vl_joint_encoder import modeling_joint_encoder

    assert modeling_joint_encoder.DEBUG_ENV == DEBUG_ENV
    assert os.environ.get(DEBUG_ENV) in (None, "", "0")  # the suite runs the default (no debug)
