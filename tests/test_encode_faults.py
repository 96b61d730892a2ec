"""Encoding and search refuse what they cannot trust (issue 14): other tools' folders, changed image files, corrupted
shards and manifests, indexes of another KB, a store no image uses, max_length 0, duplicate query ids; a kill at a
random point then a rerun equals an uninterrupted run; the Arrow reader gives the texts of `KnowledgeBase.passages`."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import datasets
import numpy as np
import pytest
import torch
from test_encode import make_kb, read_dir, run_encode, saved_model  # noqa: F401 - module fixture reused

from vl_joint_encoder.commands import encode as encode_command
from vl_joint_encoder.commands import index as index_command
from vl_joint_encoder.commands import search as search_command
from vl_joint_encoder.data.tables import ColumnMapping, read_knowledge_base
from vl_joint_encoder.retrieval import encode
from vl_joint_encoder.retrieval.kb_reader import KBReader
from vl_joint_encoder.retrieval.store import EmbeddingStore


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def assert_same_encoding(a, b):
    shards_a, ids_a, manifest_a = read_dir(a)
    shards_b, ids_b, manifest_b = read_dir(b)
    assert ids_a == ids_b and manifest_a == manifest_b and shards_a.keys() == shards_b.keys()
    for name in shards_a:
        for key in ("embeddings", "positions"):
            assert torch.equal(shards_a[name][key], shards_b[name][key]), (name, key)


def test_reader_texts_equal_knowledge_base_passages():
    rows = [
        {"id": f"p{i}", "title": [None, "", f"T{i}"][i % 3], "text": None if i == 4 else f"text {i}", "image": None}
        for i in range(40)
    ]
    rows[4]["image"] = "x.png"  # an image passage with a null text
    table = datasets.Dataset.from_list(rows)
    for source in (table, table.select(list(range(39, -1, -1)))):  # also through an indices mapping
        mapping = ColumnMapping(passage_title="title")
        kb = read_knowledge_base(source, mapping, check_texts=False)
        texts, images = kb.passages(range(len(kb)))
        got = [KBReader(kb).read(start, start + 7) for start in range(0, 40, 7)]
        assert [t for r in got for t in r.texts] == texts
        assert [i for r in got for i in r.images] == images
        assert [i for r in got for i in r.ids] == kb.passage_ids()


def test_foreign_output_folders_are_refused_untouched(saved_model, tmp_path):  # noqa: F811
    kb = make_kb(30)
    extract = tmp_path / "features"  # what extract-features writes: manifest.json of its own format + arrays
    extract.mkdir()
    (extract / "manifest.json").write_text(json.dumps({"format": "vl-joint-encoder-features", "complete": True}))
    (extract / "features-00000.safetensors").write_bytes(b"data")
    training = tmp_path / "trained"
    training.mkdir()
    (training / "config.json").write_text("{}")
    for folder in (extract, training):
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        with pytest.raises(ValueError, match="was not written by `vl-joint-encoder encode`.*new or empty"):
            run_encode(saved_model, kb, folder)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    (tmp_path / "empty").mkdir()
    run_encode(saved_model, kb, tmp_path / "empty")  # an empty folder is fine, and so is resuming it
    run_encode(saved_model, kb, tmp_path / "empty")


def test_max_length_zero_and_unused_feature_store_are_refused(saved_model, tmp_path, capsys, caplog):  # noqa: F811
    model_path, _, _ = saved_model
    kb = make_kb(10)
    with pytest.raises(ValueError, match="max_length must be a positive number of tokens, got 0"):
        run_encode(saved_model, kb, tmp_path / "zero", max_length=0)
    assert not (tmp_path / "zero").exists()
    store = tmp_path / "store.npz"
    np.savez(store, e0=np.ones((2, 16), np.float32), e1=np.ones((3, 16), np.float32))
    (tmp_path / "a.npy").write_bytes(b"")  # an image cell that is a file, not a key of the store
    np.save(tmp_path / "a.npy", np.ones((2, 16), np.float32))
    no_match = [{**r, "image": "a.npy"} for r in kb]
    common = ["--model", model_path, "--feature_store", str(store), "--image_root", str(tmp_path)]
    code = encode_command.main([*common, "--kb", write_jsonl(tmp_path / "k1.jsonl", no_match), "--output_dir",
                                str(tmp_path / "o1"), "--max_length", "0"])  # fmt: skip
    assert code == 2 and "max_length must be a positive number" in capsys.readouterr().err
    code = encode_command.main([*common, "--kb", str(tmp_path / "k1.jsonl"), "--output_dir", str(tmp_path / "o1")])
    err = capsys.readouterr().err
    assert code == 2 and "none of the KB's 10 image cells is a key of the feature store" in err, err
    text_only = write_jsonl(tmp_path / "k2.jsonl", kb)
    code = encode_command.main([*common, "--kb", text_only, "--output_dir", str(tmp_path / "o2")])
    assert code == 2 and "the KB has no image cells" in capsys.readouterr().err
    partial = [{**r, "image": "e0" if i < 4 else "a.npy"} for i, r in enumerate(kb)]
    with caplog.at_level("WARNING"):
        run_encode(saved_model, partial, tmp_path / "o3", feature_store=str(store), image_root=str(tmp_path),
                   require_feature_store_match=True)  # fmt: skip
    assert "4 of the KB's 10 image cells are keys of the feature store; the other 6 are read as" in caplog.text


def test_changed_image_file_is_not_resumed_over(saved_model, tmp_path):  # noqa: F811
    """Image cells are feature files (.npy) under image_root: rewriting one at the same path changes the
    fingerprint (size / mtime), so a resume over the complete shards is refused, and check_knowledge_base too."""
    rng = np.random.default_rng(0)
    for k in range(3):
        np.save(tmp_path / f"f{k}.npy", rng.normal(size=(2 + k, 16)).astype(np.float32))
    kb = [{**r, "image": f"f{i % 3}.npy"} for i, r in enumerate(make_kb(30))]
    run_encode(saved_model, kb, tmp_path / "out", image_root=str(tmp_path))
    encode.check_knowledge_base(tmp_path / "out", kb)  # image_root from the manifest
    before = os.stat(tmp_path / "f1.npy").st_mtime_ns
    time.sleep(0.01)
    np.save(tmp_path / "f1.npy", rng.normal(size=(3, 16)).astype(np.float32))  # same path, same size, new content
    assert os.stat(tmp_path / "f1.npy").st_mtime_ns != before
    with pytest.raises(ValueError, match="KB changed since encoding started .*image files"):
        run_encode(saved_model, kb, tmp_path / "out", image_root=str(tmp_path))
    with pytest.raises(ValueError, match="KB changed since it was encoded"):
        encode.check_knowledge_base(tmp_path / "out", kb)


def flip_bit(path, offset_from_end=5):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupted_shards_and_manifest_are_detected(saved_model, tmp_path):  # noqa: F811
    kb = make_kb(50)  # shards of 20, 20 and 10 rows
    run_encode(saved_model, kb, tmp_path / "ref")
    run_encode(saved_model, kb, tmp_path / "out")
    shard = tmp_path / "out/shards/shard-00001.safetensors"
    flip_bit(shard)  # one bit of the embeddings (the last bytes of the file are tensor data)
    EmbeddingStore(tmp_path / "out")  # fast path: sizes and the manifest's checksum only
    with pytest.raises(ValueError, match="corrupted"):
        list(EmbeddingStore(tmp_path / "out", verify=True).chunks())
    run_encode(saved_model, kb, tmp_path / "out")  # resume: the corrupted shard is found and re-encoded
    assert_same_encoding(tmp_path / "ref", tmp_path / "out")
    list(EmbeddingStore(tmp_path / "out", verify=True).chunks())
    # a truncated shard is unreadable; another (valid) shard copied over the last one: the fast path sees the size
    data = shard.read_bytes()
    shard.write_bytes(data[:-4])
    with pytest.raises(ValueError, match="missing or unreadable: re-run encode"):
        EmbeddingStore(tmp_path / "out")
    shard.write_bytes(data)
    (tmp_path / "out/shards/shard-00002.safetensors").write_bytes(data)
    with pytest.raises(ValueError, match="bytes but the manifest records"):
        EmbeddingStore(tmp_path / "out")
    # an edited manifest
    manifest = json.loads((tmp_path / "ref/manifest.json").read_text())
    manifest["count"] = 59
    (tmp_path / "ref/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="modified or corrupted after encoding"):
        EmbeddingStore(tmp_path / "ref")


def test_index_of_another_kb_and_duplicate_query_ids_are_refused(saved_model, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("faiss")
    model_path, _, _ = saved_model
    kb = make_kb(40)
    changed = [dict(r) for r in kb]
    changed[3]["text"] = "castle castle"
    for name, rows in (("a", kb), ("b", changed), ("small", kb[:30])):
        assert encode_command.main(["--model", model_path, "--kb", write_jsonl(tmp_path / f"{name}.jsonl", rows),
                                    "--output_dir", str(tmp_path / f"emb_{name}")]) == 0  # fmt: skip
    assert index_command.main(["--embeddings", str(tmp_path / "emb_a"), "--output_dir", str(tmp_path / "idx")]) == 0
    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": "q1", "question": "castle"}, {"id": "q2", "question": "war"}])
    common = ["--model", model_path, "--queries", queries, "--index", str(tmp_path / "idx"), "--k", "5"]
    assert (
        search_command.main([*common, "--embeddings", str(tmp_path / "emb_a"), "--output", str(tmp_path / "r")]) == 0
    )
    capsys.readouterr()
    for other, reason in (("emb_b", "another KB or encoding"), ("emb_small", "40 passages, the embeddings hold 30")):
        code = search_command.main([*common, "--embeddings", str(tmp_path / other), "--output", str(tmp_path / "r")])
        err = capsys.readouterr().err
        assert code == 2 and "was built over other embeddings" in err and reason in err and "rebuild it" in err, err
    # duplicate and null query ids: refused naming them, nothing written
    for rows, message in (
        ([{"id": "q1", "question": "a"}, {"id": "q1", "question": "b"}, {"id": "q2", "question": "c"}], "'q1'"),
        ([{"id": "q1", "question": "a"}, {"id": None, "question": "b"}], "null or empty id"),
    ):
        write_jsonl(tmp_path / "bad.jsonl", rows)
        code = search_command.main(["--model", model_path, "--queries", str(tmp_path / "bad.jsonl"), "--embeddings",
                                    str(tmp_path / "emb_a"), "--output", str(tmp_path / "bad.json")])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and message in err and not (tmp_path / "bad.json").exists(), err


@pytest.mark.slow
def test_kill_at_a_random_point_then_rerun_equals_uninterrupted(saved_model, tmp_path):  # noqa: F811
    """`encode` killed (SIGKILL) after a random number of complete shards plus a random delay, then rerun: the
    result is the uninterrupted one. One thread everywhere: bits are compared (see test_encode's two-process test)."""
    model_path, _, _ = saved_model
    kb = make_kb(300, seed=1)
    kb_path = write_jsonl(tmp_path / "kb.jsonl", kb)
    args = ["--model", model_path, "--kb", kb_path, "--batch_size", "8", "--shard_size", "10", "--max_length", "512"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert encode_command.main([*args, "--output_dir", str(tmp_path / "ref")]) == 0
        rng = random.Random(os.environ.get("PYTEST_SEED", 0))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        command = [sys.executable, "-m", "vl_joint_encoder", "encode", *args, "--output_dir", str(tmp_path / "out")]
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wanted, shards = rng.randint(1, 25), tmp_path / "out" / "shards"
        deadline = time.time() + 240
        while process.poll() is None and time.time() < deadline:
            if shards.is_dir() and len([p for p in shards.iterdir() if p.suffix == ".safetensors"]) >= wanted:
                time.sleep(rng.uniform(0.0, 0.05))
                break
            time.sleep(0.002)
        killed = process.poll() is None
        if killed:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert killed, f"the encode finished before the kill: {process.stderr.read()[-2000:]}"
        assert not (tmp_path / "out" / "manifest.json").exists()
        assert encode_command.main([*args, "--output_dir", str(tmp_path / "out")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert not [p for p in shards.iterdir() if p.name.startswith(".")]  # no temporary left behind
    assert_same_encoding(tmp_path / "ref", tmp_path / "out")
