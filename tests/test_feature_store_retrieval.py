"""Precomputed visual features (feature-store keys) in encoding, search and evaluation: embeddings equal the model fed
the processor's output for the store's arrays, search equals numpy brute force, MRR equals a hand computation, and
bad stores (missing keys, NaN, changed arrays) are refused with errors that name them."""

import json

import numpy as np
import pytest
import torch
from test_encode import make_kb, saved_model  # noqa: F401 - module fixture reused
from test_search import brute_force

from vl_joint_encoder.commands import encode as encode_command
from vl_joint_encoder.commands import search as search_command
from vl_joint_encoder.data.feature_stores import open_feature_store
from vl_joint_encoder.retrieval import embed, encode
from vl_joint_encoder.retrieval.evaluator import RetrievalEvaluator
from vl_joint_encoder.retrieval.store import EmbeddingStore


FEAT_DIM = 16  # tiny_config_kwargs


def make_store(n_keys=6, seed=0):
    """Keys e0..e{n-1}: features (V_k, 16) with V_k varying (padding inside batches), normalised (x1, y1, x2, y2)."""
    rng = np.random.default_rng(seed)
    store = {}
    for k in range(n_keys):
        tokens = 2 + k % 4
        corner = rng.uniform(0.0, 0.5, size=(tokens, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(0.05, 0.5, size=(tokens, 2))], axis=1)
        store[f"e{k}"] = rng.normal(size=(tokens, FEAT_DIM)).astype(np.float32)
        store[f"e{k}.visual_pos"] = boxes.astype(np.float32)
    return store


def save_store(arrays, path):
    np.savez(path, **arrays)
    return str(path)


def feature_kb(n=30):
    # passage k shows entity e{k % 6}; a few passages have no image (text only, zero visual mask in their batch)
    return [{**row, "image": None if i % 7 == 3 else f"e{i % 6}"} for i, row in enumerate(make_kb(n))]


@torch.no_grad()
def reference_embedding(model, tokenizer, text, key, arrays):
    """The model fed the processor's output for the store's arrays of `key`, alone (no padding), L2-normalised."""
    from vl_joint_encoder import JointEncoderProcessor

    processor = JointEncoderProcessor(tokenizer=tokenizer, feat_dim=FEAT_DIM)
    if key is None:
        inputs = processor(text=[text], return_tensors="pt")
    else:
        inputs = processor(
            text=[text], visual_feats=[arrays[key]], boxes=[arrays[f"{key}.visual_pos"]], return_tensors="pt"
        )
    return torch.nn.functional.normalize(model(**inputs).pooler_output, dim=-1)[0].numpy()


def test_kb_and_queries_as_store_keys_equal_the_model_through_the_processor(saved_model, tmp_path):  # noqa: F811
    model_path, model, tokenizer = saved_model
    arrays = make_store()
    store_path = save_store(arrays, tmp_path / "features.npz")
    kb = feature_kb()
    (tmp_path / "kb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kb))
    queries = [{"id": f"q{i}", "question": kb[i * 4]["text"][:20], "image": f"e{(i * 5) % 6}"} for i in range(7)]
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))

    # the CLIs, with both option spellings
    assert encode_command.main(["--model", model_path, "--kb", str(tmp_path / "kb.jsonl"), "--output-dir",
                        str(tmp_path / "emb"), "--feature-store", store_path, "--batch_size", "8",
                        "--shard_size", "16", "--max_length", "512", "--cpu"]) == 0  # fmt: skip
    assert search_command.main(["--model", model_path, "--queries", str(tmp_path / "queries.jsonl"), "--embeddings",
                               str(tmp_path / "emb"), "--feature_store", store_path, "--output",
                               str(tmp_path / "run.json"), "--k", "10", "--device", "cpu"]) == 0  # fmt: skip

    kb_ref = np.stack([reference_embedding(model, tokenizer, r["text"], r["image"], arrays) for r in kb])
    q_ref = np.stack([reference_embedding(model, tokenizer, q["question"], q["image"], arrays) for q in queries])
    embeddings, positions = EmbeddingStore(tmp_path / "emb").load_all()
    np.testing.assert_allclose(embeddings.numpy()[np.argsort(positions.numpy())], kb_ref, atol=1e-6, rtol=0)
    q_emb = embed.embed_batches(
        model, tokenizer, [q["question"] for q in queries], [q["image"] for q in queries], batch_size=3,
        feature_store=store_path,
    )
    np.testing.assert_allclose(q_emb.numpy(), q_ref, atol=1e-6, rtol=0)
    # the features matter: without them the embeddings differ
    assert np.abs(q_ref - np.stack([reference_embedding(model, tokenizer, q["question"], None, arrays)
                                    for q in queries])).max() > 1e-2  # fmt: skip

    run = json.loads((tmp_path / "run.json").read_text())
    ref_scores, ref_order = brute_force(q_ref, kb_ref, 10, "cosine")
    for i, query in enumerate(queries):
        assert list(run[query["id"]]) == [kb[j]["id"] for j in ref_order[i]]
        np.testing.assert_allclose(list(run[query["id"]].values()), ref_scores[i], atol=1e-5)

    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["feature_store"]["path"] == store_path and manifest["feature_store"]["keys"] == 6


def test_feature_files_under_image_root_equal_store_keys(saved_model, tmp_path):  # noqa: F811
    """`image_root` + relative .npz feature files give the embeddings of the same arrays as store keys."""
    _, model, tokenizer = saved_model
    arrays = make_store(3)
    (tmp_path / "feats").mkdir()
    for k in range(3):
        np.savez(tmp_path / "feats" / f"e{k}.npz", visual_feats=arrays[f"e{k}"], visual_pos=arrays[f"e{k}.visual_pos"])
    texts = [r["text"] for r in make_kb(5)]
    keys = [f"e{i % 3}" for i in range(5)]
    from_store = embed.embed_batches(model, tokenizer, texts, keys, batch_size=2, feature_store=open_feature_store(
        save_store(arrays, tmp_path / "s.npz")))  # fmt: skip
    from_files = embed.embed_batches(
        model, tokenizer, texts, [f"feats/{k}.npz" for k in keys], batch_size=2, image_root=str(tmp_path)
    )
    assert torch.equal(from_store, from_files)


def test_retrieval_evaluator_with_a_feature_store_equals_hand_mrr(saved_model, tmp_path):  # noqa: F811
    _, model, tokenizer = saved_model
    arrays = make_store()
    kb = feature_kb(24)
    # queries: a few words of a passage, another entity's image: a random model ranks the positive at varied places
    queries = [
        {"id": f"q{i}", "question": " ".join(kb[i * 3]["text"].split()[:3]), "image": f"e{(i + 2) % 6}",
         "positive_ids": [f"p{i * 3}", f"p{i * 3 + 1}"]}
        for i in range(8)
    ]  # fmt: skip
    evaluator = RetrievalEvaluator(
        queries, kb, tokenizer, metrics=["mrr@10", "mrr@100"], batch_size=5, shard_size=10,
        feature_store=save_store(arrays, tmp_path / "features.npz"),
    )  # fmt: skip
    kb_ref = np.stack([reference_embedding(model, tokenizer, r["text"], r["image"], arrays) for r in kb])
    q_ref = np.stack([reference_embedding(model, tokenizer, q["question"], q["image"], arrays) for q in queries])
    scores = q_ref.astype(np.float64) @ kb_ref.T.astype(np.float64)
    reciprocal_ranks = {10: [], 100: []}
    for i, query in enumerate(queries):
        ranked = [kb[j]["id"] for j in np.argsort(-scores[i], kind="stable")]
        first = 1 + min(ranked.index(p) for p in query["positive_ids"])
        for cutoff in reciprocal_ranks:
            reciprocal_ranks[cutoff].append(1.0 / first if first <= cutoff else 0.0)
    expected = {f"mrr@{c}": float(np.mean(v)) for c, v in reciprocal_ranks.items()}
    assert 0.0 < expected["mrr@100"] < 1.0  # not a trivial ranking
    result = evaluator(model)
    assert result.keys() == expected.keys()
    for name in expected:
        assert result[name] == pytest.approx(expected[name], abs=1e-9), name


def test_missing_keys_nan_and_changed_store_are_refused(saved_model, tmp_path, capsys):  # noqa: F811
    model_path, model, tokenizer = saved_model
    arrays = make_store()
    store_path = save_store(arrays, tmp_path / "features.npz")
    kb = feature_kb(12)
    bad_kb = [dict(r) for r in kb]
    bad_kb[2]["image"], bad_kb[5]["image"] = "e99", "Q42"
    with pytest.raises(ValueError, match=r"2 KB passages reference images that are neither keys of the feature "
                                         r"store '.*features.npz'.*p2: 'e99', p5: 'Q42'"):  # fmt: skip
        encode.encode_knowledge_base(model, tokenizer, bad_kb, tmp_path / "bad", feature_store=store_path,
                                     progress=False)  # fmt: skip
    assert not (tmp_path / "bad").exists()  # refused before anything is written
    # the CLIs: a clear message and exit code 2
    (tmp_path / "queries.jsonl").write_text(json.dumps({"id": "qx", "question": "x", "image": "e77"}) + "\n")
    encode.encode_knowledge_base(model, tokenizer, kb, tmp_path / "emb", feature_store=store_path, progress=False)
    assert search_command.main(["--model", model_path, "--queries", str(tmp_path / "queries.jsonl"), "--embeddings",
                               str(tmp_path / "emb"), "--feature_store", store_path, "--output",
                               str(tmp_path / "run.json")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "1 queries have no image" in err and "qx: 'e77'" in err and "features.npz" in err, err
    assert search_command.main(["--model", model_path, "--queries", str(tmp_path / "queries.jsonl"), "--embeddings",
                               str(tmp_path / "emb"), "--feature_store", str(tmp_path / "nope.npz"), "--output",
                               str(tmp_path / "run.json")]) == 2  # fmt: skip
    assert "nope.npz' does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="neither keys of the feature store"):
        RetrievalEvaluator([{"id": "q", "question": "x", "image": "e1", "positive_ids": ["p0"]}], bad_kb, tokenizer,
                           feature_store=store_path)  # fmt: skip

    # NaN features of a referenced key: the processor's check, naming the key
    poisoned = dict(arrays)
    poisoned["e4"] = arrays["e4"].copy()
    poisoned["e4"][1, 3] = np.nan
    with pytest.raises(ValueError, match="feature-store key 'e4' holds 1 NaN/infinite values"):
        encode.encode_knowledge_base(model, tokenizer, kb, tmp_path / "nan", progress=False,
                                     feature_store=open_feature_store(save_store(poisoned, tmp_path / "nan.npz")))  # fmt: skip

    # resuming over a changed store: refused when a referenced key's arrays changed, accepted otherwise
    changed = dict(arrays)
    changed["e1.visual_pos"] = arrays["e1.visual_pos"] * 0.5
    with pytest.raises(ValueError, match="feature store's arrays for the KB's keys differ"):
        encode.encode_knowledge_base(model, tokenizer, kb, tmp_path / "emb", progress=False,
                                     feature_store=save_store(changed, tmp_path / "changed.npz"))  # fmt: skip
    with pytest.raises(ValueError, match="features of the KB's keys differ"):
        encode.check_knowledge_base(tmp_path / "emb", kb, feature_store=str(tmp_path / "changed.npz"))
    unrelated = {**arrays, "e_other": np.ones((2, FEAT_DIM), np.float32)}
    encode.encode_knowledge_base(model, tokenizer, kb, tmp_path / "emb", progress=False,
                                 feature_store=save_store(unrelated, tmp_path / "bigger.npz"))  # fmt: skip
    encode.check_knowledge_base(tmp_path / "emb", kb, feature_store=store_path)


@torch.no_grad()
def test_extract_features_folder_as_store_equals_the_vision_tower_path(tmp_path):
    """extract-features -> encode (--feature_store FOLDER) gives the embeddings of the model run on the photos with
    its own vision tower (pixel_values), and search over them equals numpy brute force."""
    from conftest import randomize_, tiny_config_kwargs
    from PIL import Image
    from skimage import data as skdata

    from vl_joint_encoder import JointEncoderConfig, JointEncoderModel, JointEncoderProcessor
    from vl_joint_encoder.data.extraction import extract_features
    from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer
    from vl_joint_encoder.vision import tiny_clip_vision_config

    (tmp_path / "photos").mkdir()
    names = ("astronaut", "coffee", "chelsea")
    for name in names:
        Image.fromarray(getattr(skdata, name)()).save(tmp_path / "photos" / f"{name}.png")
    kb = [{**row, "image": names[i % 3]} for i, row in enumerate(make_kb(9))]
    tokenizer = train_vl_t5_tokenizer([r["text"] for r in kb] * 3, vocab_size=40)
    config = JointEncoderConfig(**tiny_config_kwargs(vocab_size=len(tokenizer), feat_dim=32),
                                vision_config=tiny_clip_vision_config(), vision_feature_select="cls_patch")  # fmt: skip
    torch.manual_seed(0)
    model = randomize_(JointEncoderModel(config)).eval()
    processor = JointEncoderProcessor.from_model_config(config, tokenizer)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    extract_features(str(tmp_path / "photos"), str(tmp_path / "feats"), str(tmp_path / "model"), batch_size=2)
    (tmp_path / "kb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kb))
    queries = [{"id": "q0", "question": "who", "image": "chelsea"}, {"id": "q1", "question": "x", "image": "coffee"}]
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    model_path = str(tmp_path / "model")
    assert encode_command.main(["--model", model_path, "--kb", str(tmp_path / "kb.jsonl"), "--output_dir", str(tmp_path / "emb"),
                        "--feature_store", str(tmp_path / "feats"), "--batch_size", "4", "--cpu"]) == 0  # fmt: skip
    assert search_command.main(["--model", model_path, "--queries", str(tmp_path / "queries.jsonl"), "--embeddings",
                               str(tmp_path / "emb"), "--feature-store", str(tmp_path / "feats"), "--output",
                               str(tmp_path / "run.json"), "--device", "cpu"]) == 0  # fmt: skip

    def tower(text, name):  # the model's own vision tower on the photo file, alone, L2-normalised
        inputs = processor(text=[text], images=[str(tmp_path / "photos" / f"{name}.png")], return_tensors="pt")
        return torch.nn.functional.normalize(model(**inputs).pooler_output, dim=-1)[0].numpy()

    kb_ref = np.stack([tower(r["text"], r["image"]) for r in kb])
    embeddings, positions = EmbeddingStore(tmp_path / "emb").load_all()
    np.testing.assert_allclose(embeddings.numpy()[np.argsort(positions.numpy())], kb_ref, atol=1e-5, rtol=0)
    q_ref = np.stack([tower(q["question"], q["image"]) for q in queries])
    run = json.loads((tmp_path / "run.json").read_text())
    ref_scores, ref_order = brute_force(q_ref, kb_ref, 9, "cosine")
    for i, query in enumerate(queries):
        assert list(run[query["id"]]) == [kb[j]["id"] for j in ref_order[i]]
        np.testing.assert_allclose(list(run[query["id"]].values()), ref_scores[i], atol=1e-5)
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["feature_store"] == {"path": str(tmp_path / "feats"), "sha256": manifest["feature_store"]["sha256"],
                                         "keys": 3}  # fmt: skip
