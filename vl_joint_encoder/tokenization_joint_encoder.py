"""The VL-T5 and VL-BART tokenizer layouts: the base vocabulary, then `<extra_id_99..0>`, then `<vis_extra_id_99..0>`.

`<vis_extra_id_k>` has id `vocab_size - 1 - k`: the model's object-order embedding reads those rows of the token
embedding, so the layout is part of the model, not a tokenizer detail.
- VL-T5 (j-min/VL-T5 `src/tokenization.py`): T5's 32000 sentencepiece pieces + T5's `<extra_id_*>`; pad 0, eos 1.
- VL-BART (j-min/VL-T5 `src/pretrain.py:59-67`, ylsung/VL_adapter `src/multitask.py:85-93`): bart-base's 50265
  byte-level BPE ids, then the trainers' `add_special_tokens({"additional_special_tokens": [<extra_id_99> ...
  <extra_id_0>] + [<vis_extra_id_99> ... <vis_extra_id_0>]})`: 50465 tokens; bos 0, pad 1, eos 2 (`<s> ... </s>`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from transformers import PreTrainedTokenizerBase
from transformers.utils import logging


logger = logging.get_logger(__name__)

EXTRA_ID = "<extra_id_{}>"
VIS_EXTRA_ID = "<vis_extra_id_{}>"


def vis_extra_id_tokens(n: int = 100) -> list[str]:
    """`<vis_extra_id_{n-1}>` ... `<vis_extra_id_0>`: the order in which they are appended to the vocabulary."""
    return [VIS_EXTRA_ID.format(k) for k in range(n - 1, -1, -1)]


def check_vl_t5_layout(tokenizer: PreTrainedTokenizerBase, vocab_size: int | None = None, n_vis: int = 100) -> None:
    """Raise a ValueError unless `<vis_extra_id_k>` = vocab_size - 1 - k and pad = 0, eos = 1 (VL-T5 layout)."""
    vocab_size = len(tokenizer) if vocab_size is None else vocab_size
    if len(tokenizer) != vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size} rows: the object-order "
            f"embedding reads rows vocab_size-1-k, so both must agree (build the tokenizer with build_vl_t5_tokenizer)"
        )
    if tokenizer.pad_token_id != 0 or tokenizer.eos_token_id != 1:
        raise ValueError(
            f"VL-T5 layout needs pad id 0 and </s> id 1, got pad {tokenizer.pad_token_id}, eos {tokenizer.eos_token_id}"
        )
    ids = tokenizer.convert_tokens_to_ids([VIS_EXTRA_ID.format(k) for k in range(n_vis)])
    wrong = [(k, i) for k, i in enumerate(ids) if i != vocab_size - 1 - k]
    if wrong:
        k, i = wrong[0]
        raise ValueError(
            f"<vis_extra_id_{k}> has id {i}, expected {vocab_size - 1 - k} (= vocab_size - 1 - k); "
            f"{len(wrong)} visual sentinel ids are misplaced: build the tokenizer with build_vl_t5_tokenizer"
        )


def build_vl_t5_tokenizer(base: PreTrainedTokenizerBase, n_extra: int = 100, n_vis: int = 100):
    """
    From a T5 tokenizer (t5-base: 32000 pieces + `<extra_id_*>` = 32100 tokens), the VL-T5 tokenizer: append
    `<vis_extra_id_{n_vis-1}>` ... `<vis_extra_id_0>` so that `<vis_extra_id_k>` = 32199 - k (vocab 32200).
    A base without `<extra_id_*>` first gets them in T5's order (`<extra_id_k>` = 32099 - k). Returns a copy.
    """
    import copy

    tokenizer = copy.deepcopy(base)
    if tokenizer.pad_token_id != 0 or tokenizer.eos_token_id != 1:
        raise ValueError(
            f"{type(base).__name__} is not a T5 tokenizer: VL-T5 needs pad id 0 and </s> id 1, got pad "
            f"{tokenizer.pad_token_id}, eos {tokenizer.eos_token_id}"
        )
    vocab = tokenizer.get_vocab()
    if VIS_EXTRA_ID.format(0) in vocab:
        check_vl_t5_layout(tokenizer, n_vis=n_vis)
        return tokenizer
    if EXTRA_ID.format(0) not in vocab:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [EXTRA_ID.format(k) for k in range(n_extra - 1, -1, -1)]},
            replace_extra_special_tokens=False,
        )
    elif tokenizer.convert_tokens_to_ids(EXTRA_ID.format(0)) != len(tokenizer) - 1:
        raise ValueError(
            "the base tokenizer has <extra_id_*> tokens but <extra_id_0> is not its last token: not the T5 layout"
        )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": vis_extra_id_tokens(n_vis)}, replace_extra_special_tokens=False
    )
    check_vl_t5_layout(tokenizer, n_vis=n_vis)
    return tokenizer


def _deterministic_pieces(pieces: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """
    The same texts must give the same tokenizer. The Unigram trainer (tokenizers `UnigramTrainer::finalize`) adds
    each required character missing from the model with score `min_score + k * 1e-4`, k counting in hash-set order,
    which changes from run to run (and scores carry float noise of ~1e-14). Give those characters their k in sorted
    order instead, round every score, and order pieces by score then text.
    """
    delta = 1e-4
    lowest = min(score for _, score in pieces)
    added = sorted(
        piece
        for piece, score in pieces
        if len(piece) == 1 and abs((score - lowest) / delta - round((score - lowest) / delta)) < 1e-3
    )
    rescored = dict(pieces)
    rescored.update({piece: lowest + k * delta for k, piece in enumerate(added)})
    return sorted(((piece, round(score, 8)) for piece, score in rescored.items()), key=lambda item: (-item[1], item[0]))


def check_vl_bart_layout(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int | None = None, n_extra: int = 100, n_vis: int = 100
) -> None:
    """Raise a ValueError unless the tokenizer has VL-BART's layout: bos 0, pad 1, eos 2, `<extra_id_k>` =
    vocab_size - 1 - n_vis - k and `<vis_extra_id_k>` = vocab_size - 1 - k (the 200 tokens appended in the trainers'
    order)."""
    vocab_size = len(tokenizer) if vocab_size is None else vocab_size
    if len(tokenizer) != vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size} rows: the object-order "
            f"embedding reads rows vocab_size-1-k, so both must agree (build the tokenizer with build_vl_bart_tokenizer)"
        )
    ids = (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id)
    if ids != (0, 1, 2):
        raise ValueError(f"VL-BART layout needs <s> 0, <pad> 1, </s> 2 (bart-base), got bos, pad, eos = {ids}")
    expected = {EXTRA_ID.format(k): vocab_size - 1 - n_vis - k for k in range(n_extra)}
    expected.update({VIS_EXTRA_ID.format(k): vocab_size - 1 - k for k in range(n_vis)})
    found = dict(zip(expected, tokenizer.convert_tokens_to_ids(list(expected))))
    wrong = [token for token, i in expected.items() if found[token] != i]
    if wrong:
        raise ValueError(
            f"{wrong[0]} has id {found[wrong[0]]}, expected {expected[wrong[0]]}; {len(wrong)} of the 200 added tokens "
            f"are misplaced (VL-BART appends <extra_id_99..0> then <vis_extra_id_99..0> to bart-base's vocabulary): "
            f"build the tokenizer with build_vl_bart_tokenizer"
        )


def build_vl_bart_tokenizer(base: PreTrainedTokenizerBase, n_extra: int = 100, n_vis: int = 100):
    """
    From a BART tokenizer (bart-base: 50265 tokens), the VL-BART tokenizer, as the original trainers build it:
    `<extra_id_{n_extra-1}..0>` then `<vis_extra_id_{n_vis-1}..0>` appended as additional special tokens, so that
    `<vis_extra_id_k>` = 50464 - k (vocab 50465). A tokenizer that already has them is checked and returned as is.
    Returns a copy.
    """
    import copy

    tokenizer = copy.deepcopy(base)
    ids = (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id)
    if ids != (0, 1, 2):
        raise ValueError(
            f"{type(base).__name__} is not a BART tokenizer: VL-BART needs <s> 0, <pad> 1, </s> 2 (bart-base), got "
            f"bos, pad, eos = {ids}"
        )
    vocab = tokenizer.get_vocab()
    if VIS_EXTRA_ID.format(0) in vocab or EXTRA_ID.format(0) in vocab:
        check_vl_bart_layout(tokenizer, n_extra=n_extra, n_vis=n_vis)
        return tokenizer
    added = [EXTRA_ID.format(k) for k in range(n_extra - 1, -1, -1)] + vis_extra_id_tokens(n_vis)
    tokenizer.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
    check_vl_bart_layout(tokenizer, n_extra=n_extra, n_vis=n_vis)
    return tokenizer


def check_tokenizer_layout(tokenizer: PreTrainedTokenizerBase, config) -> None:
    """The layout check for a joint encoder config's backbone (VL-T5 or VL-BART), against its vocabulary size."""
    if getattr(config, "backbone", "t5") == "bart":
        check_vl_bart_layout(tokenizer, config.vocab_size)
    else:
        check_vl_t5_layout(tokenizer, config.vocab_size)


def train_vl_t5_tokenizer(
    texts: Iterable[str], vocab_size: int = 2000, n_extra: int = 100, n_vis: int = 100, show_progress: bool = False
):
    """
    Train a small T5-style Unigram tokenizer on `texts` (no download needed) and give it the VL-T5 layout:
    `<pad>`=0, `</s>`=1, `<unk>`=2, learned pieces, `<extra_id_{n_extra-1}..0>`, `<vis_extra_id_{n_vis-1}..0>`.
    `vocab_size` counts the learned pieces and the three specials; the tokenizer then has vocab_size + n_extra + n_vis
    tokens. Used by the demo and the tests, since no real T5 sentencepiece model can be downloaded there.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    specials = ["<pad>", "</s>", "<unk>"]
    backend = Tokenizer(models.Unigram())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=show_progress
    )
    backend.train_from_iterator(texts, trainer=trainer)
    pieces = [(piece, score) for piece, score in json.loads(backend.to_str())["model"]["vocab"]]
    if [p for p, _ in pieces[:3]] != specials:
        raise RuntimeError(f"unexpected special-token layout after training: {pieces[:3]}")
    pieces = pieces[:3] + _deterministic_pieces(pieces[3:])
    extra = [EXTRA_ID.format(k) for k in range(n_extra - 1, -1, -1)]
    vis = vis_extra_id_tokens(n_vis)
    vocab = pieces + [(token, 0.0) for token in extra + vis]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=n_extra, additional_special_tokens=extra[::-1] + vis)
    tokenizer.backend_tokenizer.normalizer = normalizers.NFKC()
    check_vl_t5_layout(tokenizer, n_vis=n_vis)
    return tokenizer


def train_vl_bart_tokenizer(
    texts: Iterable[str], vocab_size: int = 2000, n_extra: int = 100, n_vis: int = 100, show_progress: bool = False
):
    """
    Train a small BART-style byte-level BPE tokenizer on `texts` (no download needed) and give it the VL-BART layout:
    `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, learned pieces, `<mask>` last of the base vocabulary (as bart-base's
    50264), then `<extra_id_{n_extra-1}..0>` and `<vis_extra_id_{n_vis-1}..0>`. `vocab_size` counts the base
    vocabulary (the BPE trainer may learn fewer pieces on a small corpus); texts are encoded `<s> ... </s>`. The
    backbone="bart" counterpart of `train_vl_t5_tokenizer`, for demos and tests.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import BartTokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # <mask> comes last, after training
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab["<mask>"] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    base = BartTokenizer(vocab=vocab, merges=merges, mask_token=AddedToken("<mask>", lstrip=True, rstrip=False))
    return build_vl_bart_tokenizer(base, n_extra=n_extra, n_vis=n_vis)


__all__ = [
    "build_vl_bart_tokenizer",
    "build_vl_t5_tokenizer",
    "check_tokenizer_layout",
    "check_vl_bart_layout",
    "check_vl_t5_layout",
    "train_vl_bart_tokenizer",
    "train_vl_t5_tokenizer",
    "vis_extra_id_tokens",
]
