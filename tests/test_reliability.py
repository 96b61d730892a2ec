"""Issue 14: every bad input of the data commands and the CLI ends in one line naming the file, the field and the fix
(never a raw traceback), and nothing is silently wrong. One test per case, the issue's reproduction as its fixture."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vl_joint_encoder.cli import main as cli
from vl_joint_encoder.data.tables import (
    ColumnMapping,
    DataError,
    prepare_training_data,
    read_knowledge_base,
    read_queries,
    training_data_problems,
)
from vl_joint_encoder.utils.errors import DEBUG_ENV, run_guarded


KB = [{"id": "p1", "text": "a red square"}, {"id": "p2", "text": "a blue disc"}]
QUERIES = [
    {"id": "q1", "question": "which is red?", "positive_ids": ["p1"]},
    {"id": "q2", "question": "which is blue?", "positive_ids": ["p2"]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny saved model (demo architecture), a KB and queries as JSONL, and the KB encoded with `encode`."""
    from vl_joint_encoder.demo.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("reliability")
    model, processor = build_tiny_model([r["text"] for r in KB] + [q["question"] for q in QUERIES] * 3)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    write_jsonl(root / "kb.jsonl", KB)
    write_jsonl(root / "queries.jsonl", QUERIES)
    assert cli(["encode", "--model", str(root / "model"), "--kb", str(root / "kb.jsonl"), "--output_dir",
                str(root / "embeddings"), "--cpu"]) == 0  # fmt: skip
    return root


def run(argv, capsys):
    """(exit status, stdout, stderr) of `vl-joint-encoder ARGV` in this process; stderr holds no traceback."""
    code = cli(argv)
    out = capsys.readouterr()
    assert "Traceback" not in out.err, out.err
    return code, out.out, out.err


def search_argv(world, queries, *extra):
    return ["search", "--model", str(world / "model"), "--queries", queries, "--embeddings",
            str(world / "embeddings"), "--output", str(world / "run.json"), "--device", "cpu", *extra]  # fmt: skip


# ------------------------------------------------------------------------------------- files: empty, malformed
def command_argv(world, command, path):
    model, kb, queries = str(world / "model"), str(world / "kb.jsonl"), str(world / "queries.jsonl")
    return {
        "encode": ["encode", "--model", model, "--kb", path, "--output_dir", str(world / "enc-bad"), "--cpu"],
        "search": search_argv(world, path),
        "data-report": ["data-report", "--model", model, "--queries", path, "--kb", kb],
        "qrels": ["qrels", "--queries", queries, "--kb", path, "--output", str(world / "qrels.json")],
        "train": ["train", "--model_name_or_path", model, "--train_queries", path, "--kb", kb, "--output_dir",
                  str(world / "train-bad"), "--max_steps", "1", "--per_device_train_batch_size", "2"],
    }[command]  # fmt: skip


@pytest.mark.parametrize("command", ["encode", "search", "data-report", "qrels", "train"])
def test_malformed_jsonl_names_the_file_and_line_in_every_data_command(world, command, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "p1", "text": "a red square", "question": "x"}\n{"id": "p2", "text": "a blue \n')
    code, _, err = run(command_argv(world, command, str(bad)), capsys)
    assert code == 2 and f"{bad}:2:" in err and "invalid JSON" in err, err


@pytest.mark.parametrize("command", ["encode", "search", "data-report", "qrels", "train"])
def test_empty_jsonl_is_a_clear_error_in_every_data_command(world, command, capsys, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = run(command_argv(world, command, str(empty)), capsys)
    assert code == 2 and f"{str(empty)!r} is empty" in err, err


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"id": 1}\n[1, 2]\n', ":2: a JSON list where a JSON object"),
        ('{"id": "a", "text": "x"}\n{"id": "b", "text": ["x"]}\n', "column 'text' holds a list here but a string"),
        ("   \n\n", "holds only whitespace"),
    ],
)
def test_other_json_lines_problems_name_the_line(tmp_path, content, message):
    path = tmp_path / "kb.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match="the KB") as error:
        read_knowledge_base(str(path))
    assert message in str(error.value)


# ------------------------------------------------------------------------------------------------------- ids
def test_search_refuses_queries_sharing_an_id_instead_of_dropping_one(world, capsys, tmp_path):
    # the issue: "searched 16 queries" and 15 written
    queries = write_jsonl(tmp_path / "q.jsonl", [QUERIES[0], {**QUERIES[1], "id": "q1"}])
    code, out, err = run(search_argv(world, queries), capsys)
    assert code == 2 and "1 duplicate query ids, e.g. 'q1' (column 'id')" in err and "searched" not in out


@pytest.mark.parametrize("side", ["queries", "kb"])
def test_a_null_id_never_becomes_the_string_none(side):
    queries, kb = [dict(q) for q in QUERIES], [dict(p) for p in KB]
    (queries if side == "queries" else kb)[1]["id"] = None
    with pytest.raises(DataError, match=r"1 null or empty id\(s\) in column 'id' \(rows 1\)"):
        prepare_training_data(queries, kb)
    # a positive that is null matches no passage, not a passage whose id is the string "None"
    kb = [*KB, {"id": "None", "text": "a passage named None"}]
    with pytest.raises(DataError, match=r"'q1'->None"):
        prepare_training_data([{**QUERIES[0], "positive_ids": [None]}], kb)


@pytest.mark.parametrize(
    "ids, message",
    [
        (["a", "  "], "1 null or empty id(s)"),
        ([1.5, 2.5], "neither strings nor integers (row 0: 1.5 of type float)"),
        (["a", "a"], "1 duplicate passage ids, e.g. 'a'"),
    ],
)
def test_kb_ids_are_checked_like_query_ids(ids, message):
    with pytest.raises(DataError) as error:
        read_knowledge_base([{"id": i, "text": "t"} for i in ids])
    assert message in str(error.value)


# --------------------------------------------------------------------------------------------- named columns
def test_search_image_column_typo_fails_naming_the_column_and_the_available_ones(world, capsys):
    # the issue: `search --image_column img` ran text-only with exit 0
    code, out, err = run(search_argv(world, str(world / "queries.jsonl"), "--image_column", "img"), capsys)
    assert code == 2 and "has no column 'img'" in err and "['id', 'question', 'positive_ids']" in err, err
    assert "searched" not in out
    # the default column name may be absent: text-only queries search fine
    code, out, _ = run(search_argv(world, str(world / "queries.jsonl")), capsys)
    assert code == 0 and "searched 2 queries" in out


def test_encode_and_train_named_columns_must_exist(world, capsys):
    code, _, err = run(["encode", "--model", str(world / "model"), "--kb", str(world / "kb.jsonl"), "--output_dir",
                        str(world / "enc-img"), "--cpu", "--image_column", "picture"], capsys)  # fmt: skip
    assert code == 2 and "has no column 'picture'" in err
    mapping = ColumnMapping().with_overrides(query_image="photo", negative_ids="hard")
    with pytest.raises(ValueError, match="has no column 'photo'"):
        read_queries(QUERIES, mapping)
    assert read_queries(QUERIES, ColumnMapping()).images is None  # left at its default name, a column may be absent


# ------------------------------------------------------------------------------------------------ data-report
BAD_DATA = [
    ("duplicate query ids", [QUERIES[0], {**QUERIES[1], "id": "q1"}], KB),
    ("null KB id", QUERIES, [KB[0], {**KB[1], "id": None}]),
    ("positive missing from the KB", [{**QUERIES[0], "positive_ids": ["zz"]}, QUERIES[1]], KB),
    ("empty passage text", QUERIES, [*KB, {"id": "p3", "text": " "}]),
    ("empty question", [QUERIES[0], {**QUERIES[1], "question": ""}], KB),
    ("no question column", [{"id": "q1", "query": "x", "positive_ids": ["p1"]}], KB),
    ("no query with a positive", [{**QUERIES[0], "positive_ids": []}], KB),
    ("several at once", [QUERIES[0], {**QUERIES[1], "id": "q1", "question": ""}], [KB[0], {**KB[1], "id": None}]),
    ("clean", QUERIES, KB),
]


@pytest.mark.parametrize("case, queries, kb", BAD_DATA, ids=[case for case, _, _ in BAD_DATA])
def test_data_report_reports_everything_train_would_refuse(case, queries, kb):
    refusals = training_data_problems(queries, kb)
    try:
        prepare_training_data(queries, kb)
    except ValueError as error:
        refused = error.problems if isinstance(error, DataError) else [str(error)]
    else:
        refused = []
    assert bool(refusals) == bool(refused) == (case != "clean")
    assert set(refused) <= set(refusals), (refused, refusals)
    if case == "several at once":  # train lists every problem of both sides at once, the report too
        assert len(refused) == len(refusals) == 3


def test_data_report_command_lists_the_refusals(world, capsys, tmp_path):
    queries = write_jsonl(tmp_path / "q.jsonl", [QUERIES[0], {**QUERIES[1], "id": "q1"}])
    kb = write_jsonl(tmp_path / "kb.jsonl", [KB[0], {**KB[1], "id": None}])
    argv = ["data-report", "--model", str(world / "model"), "--queries", queries, "--kb", kb]
    code, out, _ = run(argv, capsys)
    assert code == 0 and "== train would refuse this data (2 problem(s)):" in out
    assert "duplicate query ids" in out and "null or empty id(s)" in out
    assert run(argv + ["--strict"], capsys)[0] == 1
    clean = ["data-report", "--model", str(world / "model"), "--queries", str(world / "queries.jsonl"), "--kb",
             str(world / "kb.jsonl"), "--strict"]  # fmt: skip
    code, out, _ = run(clean, capsys)
    assert code == 0 and "train accepts this data" in out


# --------------------------------------------------------------------------------- raw tracebacks of the issue
@pytest.mark.parametrize("command", ["search", "train"])
@pytest.mark.parametrize(
    "content, message",
    [
        ("model: [unclosed\n", ":2:1: invalid YAML"),
        ("", "is empty: write one `option: value` per line"),
        ("- a\n- b\n", "holds a list, not a mapping"),
    ],
)
def test_bad_yaml_config_files(tmp_path, capsys, command, content, message):
    config = tmp_path / "config.yaml"
    config.write_text(content)
    code, _, err = run([command, str(config)], capsys)
    assert code == 2 and message in err and str(config) in err, err


@pytest.mark.parametrize("model", ["./no-such-model", "runs/no/such/model"])
def test_a_missing_model_folder_is_named(world, capsys, model):
    # the issue: "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"
    code, _, err = run(["search", "--model", model, "--queries", str(world / "queries.jsonl"), "--embeddings",
                        str(world / "embeddings"), "--output", str(world / "r.json"), "--device", "cpu"], capsys)  # fmt: skip
    assert code == 2 and f"model {model!r} does not exist" in err and "Repo id" not in err, err


def test_data_report_missing_model_folder(world, capsys):
    code, _, err = run(["data-report", "--model", "./gone", "--queries", str(world / "queries.jsonl"), "--kb",
                        str(world / "kb.jsonl")], capsys)  # fmt: skip
    assert code == 2 and "--model './gone' does not exist" in err


def test_device_cuda_without_a_gpu_is_refused_before_any_work(world, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, out, err = run(search_argv(world, str(world / "queries.jsonl"))[:-2] + ["--device", "cuda"], capsys)
    assert code == 2 and "--device cuda: no CUDA GPU is available here" in err and "use --device cpu" in err
    code, _, err = run(search_argv(world, str(world / "queries.jsonl"))[:-2] + ["--device", "gpu0"], capsys)
    assert code == 2 and "is not a device torch knows" in err


def test_a_run_file_that_is_a_json_list(tmp_path, capsys):
    (tmp_path / "run.json").write_text("[1, 2]")
    (tmp_path / "qrels.json").write_text('{"q1": {"p1": 1}}')
    code, _, err = run(["evaluate", "--run", str(tmp_path / "run.json"), "--qrels", str(tmp_path / "qrels.json")],
                       capsys)  # fmt: skip
    assert code == 2 and "must be a JSON object {query_id: {passage_id: value}}, got list" in err


def test_evaluate_output_in_a_missing_folder_is_refused_before_the_metrics(tmp_path, capsys):
    (tmp_path / "run.json").write_text('{"q1": {"p1": 1.0}}')
    (tmp_path / "qrels.json").write_text('{"q1": {"p1": 1}}')
    code, out, err = run(["evaluate", "--run", str(tmp_path / "run.json"), "--qrels", str(tmp_path / "qrels.json"),
                          "--output", str(tmp_path / "missing" / "m.json")], capsys)  # fmt: skip
    assert code == 2 and "does not exist: create it first" in err and out == ""  # nothing printed before


def test_a_trec_run_refuses_ids_with_whitespace(tmp_path):
    from vl_joint_encoder.retrieval.runs import write_run

    with pytest.raises(ValueError, match="hold whitespace.*'passage one'.*write a .json run"):
        write_run({"q1": {"passage one": 1.0}}, tmp_path / "run.trec")
    assert not os.listdir(tmp_path)


# -------------------------------------------------------------------------------------------- the CLI guard
def test_the_guard_prints_one_line_for_user_errors_and_bugs(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)

    def bug():
        return {}["missing"]

    assert run_guarded("prog", bug) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "prog: internal error: KeyError: 'missing' (at test_reliability.py:" in err
    assert f"{DEBUG_ENV}=1" in err and "Traceback" not in err

    def missing_dependency():
        raise ModuleNotFoundError("No module named 'faiss'", name="faiss")

    assert run_guarded("prog", missing_dependency) == 2
    assert "pip install faiss" in capsys.readouterr().err

    def out_of_memory():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert run_guarded("prog", out_of_memory) == 2
    assert "lower the batch size" in capsys.readouterr().err

    def interrupted():
        raise KeyboardInterrupt

    assert run_guarded("prog", interrupted) == 130
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(KeyError):
        run_guarded("prog", bug)


def test_debug_flag_of_the_dispatcher_shows_the_traceback(tmp_path):
    (tmp_path / "run.json").write_text("[1, 2]")
    (tmp_path / "qrels.json").write_text('{"q1": {"p1": 1}}')
    argv = ["evaluate", "--run", str(tmp_path / "run.json"), "--qrels", str(tmp_path / "qrels.json")]
    env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    plain = subprocess.run([sys.executable, "-m", "vl_joint_encoder", *argv], capture_output=True, text=True, env=env)
    debug = subprocess.run([sys.executable, "-m", "vl_joint_encoder", "--debug", *argv], capture_output=True,
                           text=True, env=env)  # fmt: skip
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "got list" in debug.stderr


# --------------------------------------------------------------------------------- images, transformers >= 5
def test_decompression_bomb_limit_is_raised_by_the_environment_variable(tmp_path, monkeypatch):
    from vl_joint_encoder.data.references import resolve_visual
    from vl_joint_encoder.images import MAX_PIXELS_ENV, ImageLoadError, load_image

    Image.fromarray(np.zeros((1000, 1200, 3), np.uint8)).save(tmp_path / "big.png")  # 1.2 MP
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000000")
    with pytest.raises(ImageLoadError, match=f"above max_pixels=1,000,000.*raise the limit with {MAX_PIXELS_ENV}"):
        resolve_visual("big.png", image_root=str(tmp_path))  # the path encode / search / train take
    monkeypatch.setenv(MAX_PIXELS_ENV, "2_000_000")
    assert resolve_visual("big.png", image_root=str(tmp_path))[1].size == (1200, 1000)
    monkeypatch.setenv(MAX_PIXELS_ENV, "none")
    assert load_image(tmp_path / "big.png", max_side=None).size == (1200, 1000)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match=f"{MAX_PIXELS_ENV}='lots': give a positive number of pixels"):
        load_image(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png", max_pixels=2_000_000).size[0] == 1200  # an explicit value wins


def test_remote_code_says_it_needs_transformers_5(world, monkeypatch):
    import importlib.util

    import transformers

    from vl_joint_encoder.configuration_joint_encoder import check_transformers_version

    check_transformers_version()  # the installed one passes
    with pytest.raises(ImportError, match=r"needs transformers >= 5, but transformers 4.57.1 is installed: pip"):
        check_transformers_version("4.57.1")
    # the file exported into a model folder (what trust_remote_code=True executes) checks on import
    monkeypatch.setattr(transformers, "__version__", "4.46.3")
    spec = importlib.util.spec_from_file_location(
        "exported_config", world / "model" / "configuration_joint_encoder.py"
    )
    with pytest.raises(ImportError, match="transformers 4.46.3 is installed"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
