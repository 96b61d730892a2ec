"""Which passages are relevant to a ViQuAE question: our implementation of the rule of the authors' code.

ViQuAE ships no relevance judgments. Its authors derive them from the answers (github PaulLerner/ViQuAE,
``meerqat``): a passage is relevant when it contains one of the question's answer strings, compared after
SQuAD-style normalisation and as whole words. This module re-implements that rule with the standard library only;
each public function names the meerqat function whose behaviour it reproduces. ``docs/viquae.md`` gives the
details and the places in the source.

The rule, as ``meerqat.ir.metrics.find_relevant`` applies it to one passage:

1. (numerical questions only, an InfoSeek addition of July 2023; ViQuAE questions have no ``question_type`` and
   are all "String") if a number written in the raw passage lies in the closed range given by the two
   ``answers``, the passage is relevant and "contains the original answer";
2. the passage and the answers are normalised by ``preprocess_answer`` (lower case, ASCII punctuation deleted,
   the words "a", "an", "the" deleted, whitespace collapsed);
3. the passage contains the original answer when ``\\b<original answer>\\b`` is found in it; it is then also
   relevant;
4. otherwise it is relevant when ``\\b<alias>\\b`` is found in it for some alias in ``answers``.

Differences from meerqat, all on inputs where meerqat's behaviour is accidental:

- ``find_relevant`` here returns ``(relevant, original)``; meerqat's returns ``(original, relevant)``;
- provenance titles are visited in their order of first appearance (meerqat iterates over a ``set``, so the
  order of ``provenance_indices`` across two or more provenance articles depends on ``PYTHONHASHSEED``);
- a number token that ``float`` cannot read is skipped (meerqat raises ``ValueError``; it happens only for
  signed tokens with two dots such as ``-.5.3``), and a numerical question whose answers are not exactly two
  numbers is refused when the matcher is built (meerqat raises at the first passage that contains a number).

An answer that normalises to the empty string (e.g. "The", "?") matches every passage that has a word character,
exactly as in meerqat (``\\b\\b``); ``AnswerMatcher(..., skip_empty_answers=True)`` drops such answers instead.
"""

import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence


__all__ = [
    "QUESTION_TYPES",
    "AnswerMatcher",
    "extend_qrels",
    "find_numbers",
    "find_relevant",
    "fuse_qrels",
    "preprocess_answer",
    "provenance_relevance",
    "training_indices_from_run",
]

# Names of meerqat.data.infoseek.QuestionType; "Time" questions are matched like "String" ones.
QUESTION_TYPES = ("String", "Numerical", "Time")

_DELETE_ASCII_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_ARTICLE_WORDS = frozenset(("a", "an", "the"))
# meerqat.data.infoseek.find_numbers; \d is Unicode-aware, as there
_NUMBER = re.compile(r"[-+]?[.]?\d+(?:,\d\d\d)*[.]?\d*(?:[eE][-+]?\d+)?")


def _delete_ascii_punctuation(text: str) -> str:
    # str.translate is fast on ASCII strings only (about 40 times slower on others, where a few replaces win)
    if text.isascii():
        return text.translate(_DELETE_ASCII_PUNCTUATION)
    for char in string.punctuation:
        if char in text:
            text = text.replace(char, "")
    return text


def preprocess_answer(text: str) -> str:
    """Normalise a passage or an answer as ``meerqat.data.loading.answer_preprocess`` does.

    Lower-case (``str.lower``), delete every character of ``string.punctuation`` (ASCII only: accents, "’", "–"
    and other non-ASCII punctuation stay), replace the whole words "a", "an", "the" by a space, then collapse
    runs of whitespace into one space and strip the ends. The order matters: "Levi's" becomes "levis" and "A.B."
    becomes "ab" (punctuation goes before the articles are looked for).
    """
    # Word by word, which gives the same string as meerqat's whole-text regex substitution (whitespace is never a
    # word character, so \b behaves at a word's ends as at the ends of the text) and is faster: a word made of
    # word characters only (str.isalnum; "_", the other \w character, is punctuation) holds an article only if it
    # is one. Most passages have no other kind of word, which one C-level test detects.
    words = _delete_ascii_punctuation(text.lower()).split()
    if "".join(words).isalnum():
        return " ".join([word for word in words if word not in _ARTICLE_WORDS])
    kept = []
    for word in words:
        if word.isalnum():
            if word not in _ARTICLE_WORDS:
                kept.append(word)
        else:
            kept.extend(_ARTICLES.sub(" ", word).split())
    return " ".join(kept)


def _spaced_ranges(text: str) -> str:
    """``meerqat.data.infoseek.clean_str_range``: a "-" right after a digit becomes " - " ("9-10" -> "9 - 10")."""
    if "-" not in text:
        return text
    return "".join(
        " - " if char == "-" and index >= 1 and text[index - 1].isdigit() else char for index, char in enumerate(text)
    )


def find_numbers(text: str) -> list[tuple[float, str]]:
    """The numbers written in ``text``, as ``meerqat.data.infoseek.find_numbers`` reads them: (value, token) pairs.

    A token is an optional sign, an optional leading ".", digits, groups of ",ddd", an optional "." and digits,
    and an optional exponent, found after a "-" that follows a digit has been spaced out (so "1990-1995" gives
    1990 and 1995, not -1995). Its value is ``float`` of the token without commas and stripped of "." at both
    ends. Quirks kept on purpose: ".5" reads as 5.0, "1,00" gives 1.0 and 0.0, "3.5.1" gives 3.5 and 1.0,
    "1 000" gives 1.0 and 0.0. A token with two dots left after stripping (only a signed one such as "-.5.3")
    makes meerqat raise ``ValueError``; it is skipped here.
    """
    numbers = []
    for token in _NUMBER.findall(_spaced_ranges(text)):
        cleaned = token.replace(",", "").strip(".")
        if cleaned.count(".") > 1:
            cleaned = cleaned.split(".")[0]
        try:
            numbers.append((float(cleaned), token))
        except ValueError:
            continue
    return numbers


def _whole_word(preprocessed: str) -> re.Pattern:
    # The preprocessed text holds no ASCII punctuation, so escaping changes nothing: meerqat's unescaped
    # rf"\b{answer}\b" is this same literal pattern.
    return re.compile(r"\b" + re.escape(preprocessed) + r"\b")


class AnswerMatcher:
    """The answers of one question, compiled once, to test many passages (``meerqat.ir.metrics.find_relevant``).

    Parameters
    ----------
    answers:
        ``item['output']['answer']``: the answer and its aliases (for a "Numerical" question, the two ends of the
        accepted range, as strings or numbers).
    original_answer:
        ``item['output']['original_answer']``.
    question_type:
        "String" (ViQuAE), "Numerical" or "Time" (``meerqat.data.infoseek.QuestionType``).
    skip_empty_answers:
        drop answers that normalise to "" (meerqat keeps them, and they match nearly every passage).
    """

    def __init__(
        self,
        answers: Iterable[str],
        original_answer: str,
        question_type: str = "String",
        skip_empty_answers: bool = False,
    ):
        if question_type not in QUESTION_TYPES:
            raise ValueError(f"question_type must be one of {QUESTION_TYPES}, got {question_type!r}")
        answers = list(answers)
        self.question_type = question_type
        self.numeric_range = None
        if question_type == "Numerical":
            # meerqat.ir.metrics.numerical_relevant: answer_range = [float(a) for a in answer], then
            # infoseek.in_range unpacks exactly two bounds
            bounds = [float(answer) for answer in answers]
            if len(bounds) != 2:
                raise ValueError(f"a Numerical question needs two answers (the range), got {answers!r}")
            self.numeric_range = (bounds[0], bounds[1])

        self.original = preprocess_answer(original_answer)
        if skip_empty_answers and not self.original:
            self._original = None
        else:
            self._original = (self.original, _whole_word(self.original))
        aliases = []
        seen = {self.original}
        for answer in answers:
            alias = preprocess_answer(str(answer))
            if alias in seen or (skip_empty_answers and not alias):
                continue
            seen.add(alias)
            aliases.append(alias)
        self.aliases = tuple(aliases)
        self._aliases = tuple((alias, _whole_word(alias)) for alias in aliases)

    @classmethod
    def from_item(cls, item: Mapping, **kwargs) -> "AnswerMatcher":
        """Build from a ViQuAE question (its ``output`` and optional ``question_type``, as ``find_relevant_item``)."""
        output = item["output"]
        question_type = kwargs.pop("question_type", item.get("question_type") or "String")
        return cls(output["answer"], output["original_answer"], question_type=question_type, **kwargs)

    def _in_numeric_range(self, passage: str) -> bool:
        low, high = self.numeric_range
        return any(low <= value <= high for value, _ in find_numbers(passage))

    def match(self, passage: str) -> tuple[bool, bool]:
        """``(relevant, contains_original)`` for one passage, the passage as stored (not preprocessed)."""
        if self.numeric_range is not None and self._in_numeric_range(passage):
            return True, True
        text = preprocess_answer(passage)
        if self._original is not None:
            literal, pattern = self._original
            if literal in text and pattern.search(text) is not None:
                return True, True
        for literal, pattern in self._aliases:
            if literal in text and pattern.search(text) is not None:
                return True, False
        return False, False

    def contains(self, passage: str) -> bool:
        """Whether the passage contains any answer (the original one or an alias): meerqat's "relevant"."""
        return self.match(passage)[0]

    def contains_original(self, passage: str) -> bool:
        """Whether the passage contains the original answer: meerqat's "original_relevant"."""
        return self.match(passage)[1]

    def find(self, passages: Iterable[str], ids: Iterable | None = None) -> tuple[list, list]:
        """``(relevant, original)``: the ids (default: positions) of the passages that contain any answer, and
        of those that contain the original answer, in the order of ``passages``."""
        relevant, original = [], []
        passages = passages if isinstance(passages, Sequence) else list(passages)
        ids = range(len(passages)) if ids is None else ids
        for passage_id, passage in zip(ids, passages, strict=True):
            is_relevant, is_original = self.match(passage)
            if is_relevant:
                relevant.append(passage_id)
            if is_original:
                original.append(passage_id)
        return relevant, original


def find_relevant(
    passages: Sequence[str],
    answers: Iterable[str],
    original_answer: str,
    question_type: str = "String",
    ids: Iterable | None = None,
) -> tuple[list, list]:
    """``meerqat.ir.metrics.find_relevant`` over the given passage texts.

    Returns ``(relevant, original)``: positions in ``passages`` (or the matching entries of ``ids``) of the
    passages containing any of ``answers`` or ``original_answer``, and of those containing ``original_answer``
    (a subset of the first). NB meerqat returns the same two lists in the other order.
    """
    return AnswerMatcher(answers, original_answer, question_type=question_type).find(passages, ids=ids)


def _texts(passage_text: Callable[[int], str] | Sequence[str]) -> Callable[[int], str]:
    return passage_text if callable(passage_text) else passage_text.__getitem__


def provenance_relevance(
    item: Mapping,
    title2index: Mapping[str, int],
    article2passage: Mapping[int, Sequence[int]],
    passage_text: Callable[[int], str] | Sequence[str],
    matcher: AnswerMatcher | None = None,
) -> tuple[list[int], list[int]]:
    """``meerqat.ir.metrics.find_relevant_item`` with ``provenance_key='provenance'``.

    The question's articles are the titles ``provenance['title'][0]`` of ``item['output']['provenance']``
    (unique, first-appearance order; titles missing from ``title2index`` are skipped). Their passages, in
    ``article2passage`` order, are tested with ``matcher`` (default: built from the item).

    Returns ``(provenance_indices, original_answer_provenance_indices)``: passage ids, as meerqat saves them
    under those two column names (``{'<id>': 1 for id in provenance_indices}`` is its qrels entry).
    """
    matcher = AnswerMatcher.from_item(item) if matcher is None else matcher
    text_of = _texts(passage_text)
    titles = []
    for provenance in item["output"]["provenance"]:
        if provenance["title"] and provenance["title"][0] not in titles:
            titles.append(provenance["title"][0])
    relevant, original = [], []
    for title in titles:
        if title not in title2index:
            continue
        passage_ids = list(article2passage.get(title2index[title], []))
        r, o = matcher.find([text_of(i) for i in passage_ids], ids=passage_ids)
        relevant.extend(r)
        original.extend(o)
    return relevant, original


def training_indices_from_run(
    retrieved: Sequence[int],
    passage_text: Callable[[int], str] | Sequence[str],
    original_answer: str,
    fallback_positives: Sequence[int],
    negatives_order: str = "meerqat",
) -> tuple[list[int], list[int]]:
    """``keep_relevant_search_wrt_original_in_priority`` of the authors' EXPERIMENTS.rst, for one question.

    ``retrieved``: the passage ids of the run for this question (BM25 for DPR, the fused run for ECA/ILF), in run
    order. Only the original answer is looked for (meerqat passes no alias). Returns
    ``(KEY_provenance_indices, KEY_irrelevant_indices)``:

    - positives: the retrieved passages that contain the original answer, in run order; if there are none,
      ``fallback_positives`` (the question's ``original_answer_provenance_indices``);
    - negatives: the retrieved passages that do not contain the original answer (they may contain an alias).
      meerqat builds them as ``list(set(retrieved) - set(positives found in the run))``, whose order is CPython's
      set order, not the rank; ``negatives_order="meerqat"`` reproduces that list exactly, ``"rank"`` keeps the
      run order. Training with ``M=2, n_relevant_passages=1`` uses the first element of each list.
    """
    if negatives_order not in ("meerqat", "rank"):
        raise ValueError(f"negatives_order must be 'meerqat' or 'rank', got {negatives_order!r}")
    text_of = _texts(passage_text)
    retrieved = [int(i) for i in retrieved]
    matcher = AnswerMatcher([], original_answer)
    found, _ = matcher.find([text_of(i) for i in retrieved], ids=retrieved)
    positives = found if found else list(fallback_positives)
    if negatives_order == "meerqat":
        negatives = list(set(retrieved) - set(found))
    else:
        found_set = set(found)
        negatives = [i for i in retrieved if i not in found_set]
    return positives, negatives


def extend_qrels(
    run: Mapping[str, Iterable],
    matchers: Mapping[str, AnswerMatcher],
    passage_text: Callable[[int], str] | Sequence[str],
    qrels: dict[str, dict[str, int]] | None = None,
    qnonrels: dict[str, dict[str, int]] | None = None,
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """The relevance extension that ``meerqat.ir.search.Searcher.__call__`` applies to every run it computes.

    For each question of ``run`` (question id -> retrieved passage ids, e.g. a ranx-style ``{doc_id: score}``),
    the retrieved passages not yet judged (in neither ``qrels`` nor ``qnonrels``) are tested with the question's
    matcher (any answer counts). Relevant ones are added to ``qrels[q_id]`` with value 1, the others to
    ``qnonrels[q_id]`` with 0. Both dicts are updated in place and returned; doc ids are strings, as in ranx.
    Calling it once per system and evaluating every system against the final ``qrels`` is what meerqat does.
    """
    qrels = {} if qrels is None else qrels
    qnonrels = {} if qnonrels is None else qnonrels
    text_of = _texts(passage_text)
    for q_id, retrieved in run.items():
        judged_relevant = qrels.setdefault(q_id, {})
        judged_irrelevant = qnonrels.setdefault(q_id, {})
        new = [
            doc_id
            for doc_id in dict.fromkeys(str(doc_id) for doc_id in retrieved)
            if doc_id not in judged_relevant and doc_id not in judged_irrelevant
        ]
        if not new:
            continue
        relevant, _ = matchers[q_id].find([text_of(int(doc_id)) for doc_id in new], ids=new)
        relevant = set(relevant)
        for doc_id in new:
            if doc_id in relevant:
                judged_relevant[doc_id] = 1
            else:
                judged_irrelevant[doc_id] = 0
    return qrels, qnonrels


def fuse_qrels(all_qrels: Iterable[Mapping[str, Mapping[str, int]]]) -> dict[str, dict[str, int]]:
    """``meerqat.ir.metrics.fuse_qrels``: the union of several qrels; a document judged differently fails."""
    fused: dict[str, dict[str, int]] = {}
    for position, qrels in enumerate(all_qrels):
        for q_id, judgments in qrels.items():
            target = fused.setdefault(q_id, {})
            for doc_id, score in judgments.items():
                if doc_id in target and target[doc_id] != score:
                    raise ValueError(
                        f"qrels #{position} judges document {doc_id!r} of question {q_id!r} {score}, "
                        f"an earlier one {target[doc_id]}"
                    )
                target[doc_id] = score
    return fused
