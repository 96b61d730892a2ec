"""vl_joint_encoder.viquae.relevance against meerqat's relevance rule (github PaulLerner/ViQuAE).

Every expectation below was worked out by hand from the meerqat source: ``meerqat/data/loading.py``
(``answer_preprocess`` = ``white_space_fix(remove_articles(remove_punc(answer.lower())))``, ``remove_punc`` deleting
the characters of ``string.punctuation``, ``remove_articles`` = ``re.sub(r"\\b(a|an|the)\\b", " ", text)``),
``meerqat/ir/metrics.py`` (``find_relevant``: numerical branch, then ``re.search(rf"\\b{answer}\\b", passage)`` for the
original answer, then for each alternative answer; ``find_relevant_item``) and ``meerqat/data/infoseek.py``
(``clean_str_range``, ``find_numbers``, ``metric_numerical_range``, ``in_range``). Each case names the branch it
exercises.
"""

import pytest

from vl_joint_encoder.viquae.relevance import (
    AnswerMatcher,
    extend_qrels,
    find_numbers,
    find_relevant,
    fuse_qrels,
    preprocess_answer,
    provenance_relevance,
    training_indices_from_run,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        # lower() first, then remove_punc deletes the ASCII apostrophe without inserting a space
        ("Levi's", "levis"),
        # remove_articles runs after lower(): "The" is an article
        ("The Beatles", "beatles"),
        # punctuation goes before articles are looked for: "A.B.C." -> "abc" is no article
        ("A.B.C. Ltd.", "abc ltd"),
        # accents are kept (no unicode normalisation); only case changes
        ("Café de FLORE", "café de flore"),
        # U+2019 and U+2013 are not in string.punctuation: kept
        ("l’Étoile – Paris", "l’étoile – paris"),
        # white_space_fix: split() on any whitespace, joined by single spaces, ends stripped
        ("  New\tYork\n ", "new york"),
        # an answer that is only an article becomes empty
        ("The", ""),
        # "-" is punctuation: "a-ha" -> "aha", which is not the article "a"
        ("a-ha", "aha"),
        # whole-word articles only: "Theatre", "Anna", "thea" keep their letters
        ("Theatre of Anna and a man", "theatre of anna and man"),
        # "\b(a|an|the)\b" also fires next to a non-ASCII non-word character: "the’s" -> " ’s"
        ("The’s", "’s"),
        # separators of numbers are punctuation: "1,000.5" -> "10005"
        ("1,000.5", "10005"),
        ("AC/DC", "acdc"),
        # "_" is in string.punctuation
        ("snake_case", "snakecase"),
    ],
)
def test_preprocess_answer(text, expected):
    assert preprocess_answer(text) == expected


@pytest.mark.parametrize(
    "passage, alias, relevant",
    [
        # whole word: "\bparis\b" is not found in "parisian"
        ("The Parisian metro", "Paris", False),
        # the comma is deleted, the boundary stays: "paris france"
        ("Paris, France", "Paris", True),
        # a one-word alias inside a longer name still matches as a whole word
        ("He moved to New York.", "York", True),
        # multi-word alias: the space must be in the passage after normalisation ("new-york" -> "newyork")
        ("the new-york times", "New York", False),
        ("the NEW   YORK times", "New York", True),
        # the ASCII apostrophe vanishes on both sides ("levis"), the curly one only on neither
        ("Levis jeans", "Levi's", True),
        ("Levi’s jeans", "Levi's", False),
        # accents are not folded
        ("a cafe in Rome", "Café", False),
        # numbers through the string rule: separators vanish on both sides
        ("1000 men", "1,000", True),
        ("1.000 men", "1,000", True),
        # ... which also makes "3.5" match "35" (a false positive of the rule)
        ("35 km long", "3.5", True),
        # "1990s" is one word
        ("in the 1990s", "1990", False),
        ("born (1990) in", "1990", True),
        # "1990-1995" -> "19901995": the year is not a word of it
        ("reigned 1990-1995", "1990", False),
        # the title prefix is part of the matched text; "[SEP]" normalises to "sep"
        ("Paris [SEP] It is a big city.", "Paris", True),
        ("Lyon [SEP] It is a big city.", "sep", True),
    ],
)
def test_whole_word_matching(passage, alias, relevant):
    # the alias is an alternative answer: relevant, but not "original" (original_answer matches nothing here)
    assert find_relevant([passage], [alias], "zzz-unmatched") == (([0], []) if relevant else ([], []))


def test_original_versus_alias_and_return_order():
    passages = [
        "Jackie Wilson [SEP] The song advertised Levi's jeans.",  # original answer (and alias)
        "Jackie Wilson [SEP] He sang for Levi Strauss & Co.",  # alias "Levi Strauss" only
        "Jackie Wilson [SEP] Nothing about it here.",  # neither
    ]
    # meerqat returns (original_relevant, relevant); ours returns (relevant, original)
    relevant, original = find_relevant(passages, ["Levi's", "Levi Strauss"], "Levi's")
    assert relevant == [0, 1]
    assert original == [0]
    # ids replace positions, e.g. passage ids of a run
    assert find_relevant(passages, ["Levi Strauss"], "Levi's", ids=[70, 80, 90]) == ([70, 80], [70])
    matcher = AnswerMatcher(["Levi Strauss"], "Levi's")
    assert [matcher.match(p) for p in passages] == [(True, True), (True, False), (False, False)]
    assert matcher.contains(passages[1]) and not matcher.contains_original(passages[1])


def test_article_removal_in_answers():
    # original answer "The Who" normalises to "who": any passage with the word "who" contains it
    assert find_relevant(["Who is there?", "The Whole band"], [], "The Who") == ([0], [0])


def test_empty_answer_matches_like_meerqat():
    # an alias that normalises to "" gives the pattern \b\b, found in any text that has a word character
    passages = ["Anything at all", "...", ""]
    assert find_relevant(passages, ["The"], "zzz") == ([0], [])
    # opt-out
    matcher = AnswerMatcher(["The"], "zzz", skip_empty_answers=True)
    assert matcher.find(passages) == ([], [])
    # an empty original answer behaves the same way, and counts as "original"
    assert find_relevant(passages, [], "?") == ([0], [0])


@pytest.mark.parametrize(
    "text, expected",
    [
        # find_numbers regex with ",ddd" groups; commas removed before float()
        ("1,000,000 people", [(1000000.0, "1,000,000")]),
        # clean_str_range spaces a "-" that follows a digit: two years, not 1990 and -1995
        ("1990-1995", [(1990.0, "1990"), (1995.0, "1995")]),
        # a "-" after a space keeps its sign; "+" too
        ("-5 and +3", [(-5.0, "-5"), (3.0, "+3")]),
        # decimals and exponents
        ("3.14 and 1.5e3", [(3.14, "3.14"), (1500.0, "1.5e3")]),
        # strip(".") quirk: ".5" reads as 5
        (".5", [(5.0, ".5")]),
        # a group of two digits is no thousands group: "1,00" -> 1 and 00
        ("1,00", [(1.0, "1"), (0.0, "00")]),
        # the regex stops at the second dot: "3.5" and ".1"
        ("3.5.1", [(3.5, "3.5"), (1.0, ".1")]),
        # meerqat raises ValueError on "-.5.3" (split('.')[0] == "-"); ours skips the token
        ("-.5.3", []),
        ("no digits", []),
    ],
)
def test_find_numbers(text, expected):
    assert find_numbers(text) == expected


def test_numerical_answers_by_range():
    # question_type "Numerical" (InfoSeek): answers are the range [low, high], inclusive (infoseek.in_range)
    matcher = AnswerMatcher(["0.9", "1.1"], "1", question_type="Numerical")
    # numerical branch: 1.0 in [0.9, 1.1] -> relevant AND original
    assert matcher.match("It is about 1 metre long.") == (True, True)
    assert matcher.match("between 0.95 and 2 metres") == (True, True)
    # 1050 is out of range; string branch: "\b1\b" not in "1050 metres", aliases "09", "11" neither
    assert matcher.match("1,050 metres") == (False, False)
    # ".95" reads as 95 (out of range) and normalises to "95"
    assert matcher.match("only .95 of it") == (False, False)

    # ranges in passages: "9-10" -> 9 and 10, and 10 is in [9.5, 10.5]
    ages = AnswerMatcher(["9.5", "10.5"], "10", question_type="Numerical")
    assert ages.match("children aged 9-10") == (True, True)
    # "-10" (no digit before "-") is minus ten: numerical branch fails, the string branch finds "\b10\b"
    assert ages.match("it fell to -10 degrees") == (True, True)
    # exponents; equal bounds
    assert AnswerMatcher(["9e4", "1.1e5"], "x", question_type="Numerical").match("1e5 stars") == (True, True)
    assert AnswerMatcher(["1990", 1990], "x", question_type="Numerical").match("in 1990.") == (True, True)
    # ViQuAE questions are "String": a year is then only matched as a word
    assert AnswerMatcher(["1990"], "1990").match("in 1990.") == (True, True)
    assert AnswerMatcher(["1990"], "1990").match("around 1989") == (False, False)
    # "Time" questions use the string rule
    assert AnswerMatcher(["1990"], "1990", question_type="Time").match("around 1990") == (True, True)


def test_bad_question_types():
    with pytest.raises(ValueError):
        AnswerMatcher(["1", "2", "3"], "2", question_type="Numerical")
    with pytest.raises(ValueError):
        AnswerMatcher(["Paris"], "Paris", question_type="string")


def test_provenance_relevance():
    passages = [
        "Paris [SEP] Paris is the capital of France.",  # 0, article 0
        "Paris [SEP] It hosts the Louvre.",  # 1, article 0
        "Louvre [SEP] The Louvre is in Paris.",  # 2, article 1
        "Louvre [SEP] It opened in 1793.",  # 3, article 1
    ]
    title2index = {"Paris": 0, "Louvre": 1}
    article2passage = {0: [0, 1], 1: [2, 3]}
    item = {
        "output": {
            "answer": ["Louvre", "Musée du Louvre"],
            "original_answer": "The Louvre",
            "provenance": [
                {"title": ["Louvre"]},
                {"title": ["Paris"]},
                {"title": ["Louvre"]},  # duplicate: visited once (meerqat uses a set)
                {"title": ["Not In The KB"]},  # skipped
            ],
        }
    }
    # original "the louvre" -> "louvre": passages 2 and 3 contain it (3 through its title prefix "Louvre [SEP]"),
    # and 1; articles in first-appearance order of the titles (Louvre, then Paris), passages in article2passage order
    assert provenance_relevance(item, title2index, article2passage, passages) == ([2, 3, 1], [2, 3, 1])
    # "musée du louvre" is in no passage: the same passages are relevant through the alias "Louvre" only
    item["output"]["original_answer"] = "Musée du Louvre"
    assert provenance_relevance(item, title2index, article2passage, passages) == ([2, 3, 1], [])
    # a callable passage store works too
    assert provenance_relevance(item, title2index, article2passage, lambda i: passages[i]) == ([2, 3, 1], [])


def test_training_indices_from_run():
    texts = {
        30: "A [SEP] nothing",
        2: "B [SEP] alias only: Levi Strauss",
        17: "C [SEP] they wore Levi's",
        5: "D [SEP] nothing either",
        8: "E [SEP] Levi's again",
    }
    run = [30, 2, 17, 5, 8]
    positives, negatives = training_indices_from_run(run, texts.__getitem__, "Levi's", fallback_positives=[99])
    # retrieved passages with the original answer, in rank order
    assert positives == [17, 8]
    # meerqat: list(set(indices) - set(relevant_indices)); the alias-only passage 2 is a negative
    assert negatives == list(set(run) - {17, 8})
    assert sorted(negatives) == [2, 5, 30]
    assert training_indices_from_run(run, texts, "Levi's", [99], negatives_order="rank")[1] == [30, 2, 5]
    # no retrieved passage with the original answer: the provenance fallback, every retrieved one negative
    assert training_indices_from_run([30, 5], texts, "Levi's", fallback_positives=[99, 98]) == (
        [99, 98],
        list(set([30, 5]) - set()),
    )


def test_extend_qrels_only_judges_new_passages():
    texts = {1: "x [SEP] Paris", 2: "x [SEP] Lyon", 3: "x [SEP] paris!", 4: "x [SEP] none"}
    calls = []

    def text_of(i):
        calls.append(i)
        return texts[i]

    matchers = {"q": AnswerMatcher(["Paris"], "Paris")}
    qrels, qnonrels = extend_qrels({"q": {"1": 9.0, "2": 8.0}}, matchers, text_of)
    assert qrels == {"q": {"1": 1}} and qnonrels == {"q": {"2": 0}}
    # a second system: 1 and 2 are already judged, 3 and 4 are new
    extend_qrels({"q": ["2", "3", "1", "4"]}, matchers, text_of, qrels=qrels, qnonrels=qnonrels)
    assert qrels == {"q": {"1": 1, "3": 1}} and qnonrels == {"q": {"2": 0, "4": 0}}
    assert calls == [1, 2, 3, 4]


def test_fuse_qrels():
    fused = fuse_qrels([{"a": {"1": 1}}, {"a": {"2": 1}, "b": {"3": 1}}])
    assert fused == {"a": {"1": 1, "2": 1}, "b": {"3": 1}}
    with pytest.raises(ValueError):
        fuse_qrels([{"a": {"1": 1}}, {"a": {"1": 0}}])
