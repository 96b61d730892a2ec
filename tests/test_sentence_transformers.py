"""A saved joint encoder loads with `SentenceTransformer(folder, trust_remote_code=True)` and encodes exactly as the
package does: text only, image only, both, batches with and without images; shared and separate towers; with a vision
tower (photos) and without (precomputed features). And `SentenceTransformerTrainer` with
(Cached)MultipleNegativesRankingLoss trains a shared-tower model on the package's data format."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import randomize_, tiny_config_kwargs
from PIL import Image
from skimage import data as photos
from synthetic_retrieval import all_texts, make_task, positive_mrr


sentence_transformers = pytest.importorskip("sentence_transformers")
from sentence_transformers import SentenceTransformer  # noqa: E402

from vl_joint_encoder import JointEncoderConfig, JointEncoderModel  # noqa: E402
from vl_joint_encoder.bi_encoder import JointEncoderBiEncoder  # noqa: E402
from vl_joint_encoder.processing_joint_encoder import JointEncoderProcessor, default_image_processor  # noqa: E402
from vl_joint_encoder.retrieval.embed import embed_batches  # noqa: E402
from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer  # noqa: E402
from vl_joint_encoder.vision import attach_vision_tower, processor_for_tower, tiny_clip_vision_config  # noqa: E402


QUESTIONS = ["what is in the cup", "who is this", "when was it built", "what animal is this"]
PASSAGES = [
    "a cup of coffee on a saucer.",
    "an astronaut in a white suit.",
    "a cat lying on a sofa.",
    "a rocket on the launch pad, built in 1969 by many engineers over several years.",
]
QUERIES, KB, STORE = make_task(n_entities=8)


@pytest.fixture(scope="module")
def tokenizer():
    return train_vl_t5_tokenizer((QUESTIONS + PASSAGES + all_texts(QUERIES, KB)) * 20, vocab_size=120)


@pytest.fixture(scope="module")
def images():
    return [Image.fromarray(getattr(photos, name)()) for name in ("coffee", "astronaut", "chelsea", "rocket")]


@pytest.fixture(scope="module")
def tower_model(tokenizer, tmp_path_factory):
    """(folder, model, processor): a tiny joint encoder with a tiny CLIP tower, random weights, saved."""
    from transformers import CLIPVisionModel

    clip = str(tmp_path_factory.mktemp("clip"))
    torch.manual_seed(0)
    CLIPVisionModel(tiny_clip_vision_config()).save_pretrained(clip)
    default_image_processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)
    text_model = randomize_(
        JointEncoderModel(
            JointEncoderConfig(
                **tiny_config_kwargs(vocab_size=len(tokenizer), feat_dim=32, similarity="cosine", text_prefix="vqa: ")
            )
        )
    )
    model = attach_vision_tower(text_model, clip).eval()
    processor = processor_for_tower(model, tokenizer, clip)
    folder = str(tmp_path_factory.mktemp("tower-model"))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


def reference(model, processor, text=None, images=None, max_length=256):
    """THE package's embedding of one input: the processor's batch of one, `JointEncoderModel.encode`."""
    kwargs = {}
    if images:
        kwargs["images"] = [images] if text is not None else images
    batch = processor(
        text=[text] if text is not None else None,
        **kwargs,
        return_tensors="pt",
        truncation=True,
        max_length=max_length,
    )
    with torch.no_grad():
        return model.encode(**batch)[0]


def test_saved_folder_has_the_sentence_transformers_files(tower_model):
    folder, model, _ = tower_model
    modules = json.load(open(os.path.join(folder, "modules.json")))
    assert modules == [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers_joint_encoder.JointEncoderModule"}
    ]
    config = json.load(open(os.path.join(folder, "config_sentence_transformers.json")))
    assert config["similarity_fn_name"] == model.config.similarity
    for name in (
        "sentence_transformers_joint_encoder.py",
        "sentence_transformers_files.py",
        "modeling_joint_encoder.py",
        "processing_joint_encoder.py",
        "config.json",
        "model.safetensors",
        "processor_config.json",
    ):
        assert os.path.isfile(os.path.join(folder, name)), name


def test_encode_equals_the_package_with_a_vision_tower(tower_model, images):
    folder, model, processor = tower_model
    st = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
    # the module ran from the folder's own code (remote code), not from this package
    assert type(st[0]).__module__.startswith("transformers_modules."), type(st[0]).__module__
    coffee, astronaut, cat, rocket = images
    inputs = [
        QUESTIONS[0],  # text only
        {"text": QUESTIONS[1], "image": astronaut},  # question + image
        cat,  # image only
        {"text": PASSAGES[3], "image": None},  # passage without image
        {"text": PASSAGES[0], "image": coffee},  # passage with image
        {"image": [rocket, coffee]},  # two images, no text
        {"text": QUESTIONS[2], "image": [rocket, cat]},  # two images with text
    ]
    expected = torch.stack(
        [
            reference(model, processor, QUESTIONS[0]),
            reference(model, processor, QUESTIONS[1], [astronaut]),
            reference(model, processor, None, [cat]),
            reference(model, processor, PASSAGES[3]),
            reference(model, processor, PASSAGES[0], [coffee]),
            reference(model, processor, None, [[rocket, coffee]]),
            reference(model, processor, QUESTIONS[2], [rocket, cat]),
        ]
    )
    for batch_size in (1, 3, 7):  # batches mixing text-only, image-only and both
        got = st.encode(inputs, batch_size=batch_size, convert_to_tensor=True)
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)
    # the similarity is the model's (cosine here), on the same embeddings
    queries = st.encode_query([{"text": QUESTIONS[1], "image": astronaut}, QUESTIONS[0]], convert_to_tensor=True)
    docs = st.encode_document([{"text": PASSAGES[0], "image": coffee}, PASSAGES[3]], convert_to_tensor=True)
    torch.testing.assert_close(st.similarity(queries, docs), model.similarity(queries, docs), atol=1e-6, rtol=0)
    torch.testing.assert_close(queries, expected[[1, 0]], atol=2e-6, rtol=0)


def test_passage_batches_equal_the_package_kb_encoding(tower_model, images, tmp_path):
    """A KB with and without passage images, encoded by the package (embed_batches, the KB encoder's batches) and by
    sentence-transformers' encode_document."""
    folder, model, processor = tower_model
    st = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
    passage_images = [images[0], None, images[2], None]
    ours = embed_batches(model, processor, PASSAGES, passage_images, batch_size=4, max_length=256)
    theirs = st.encode_document(
        [{"text": t, "image": i} for t, i in zip(PASSAGES, passage_images)], batch_size=4, convert_to_tensor=True
    )
    torch.testing.assert_close(theirs, ours, atol=2e-6, rtol=0)
    # text-only KB (no image anywhere in the batch)
    ours = embed_batches(model, processor, PASSAGES, None, batch_size=4, max_length=256)
    torch.testing.assert_close(
        st.encode_document(PASSAGES, batch_size=4, convert_to_tensor=True), ours, atol=2e-6, rtol=0
    )


def test_features_model_and_dot_similarity(tokenizer, tmp_path):
    """A model without vision tower (converted VL-T5 / VL-Adapter: precomputed features) takes feature arrays."""
    torch.manual_seed(1)
    model = randomize_(
        JointEncoderModel(JointEncoderConfig(**tiny_config_kwargs(vocab_size=len(tokenizer), similarity="dot")))
    ).eval()
    processor = JointEncoderProcessor.from_model_config(model.config, tokenizer)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    st = SentenceTransformer(str(tmp_path), trust_remote_code=True, device="cpu")
    feats = [STORE["entity_0"], STORE["entity_3"]]
    got = st.encode(
        [{"text": QUESTIONS[0], "image": feats[0]}, QUESTIONS[1], {"text": PASSAGES[0], "image": feats[1]}],
        batch_size=3,
        convert_to_tensor=True,
    )
    with torch.no_grad():
        expected = torch.cat(
            [
                model.encode(**processor(text=[QUESTIONS[0]], visual_feats=[feats[0]], return_tensors="pt")),
                model.encode(**processor(text=[QUESTIONS[1]], return_tensors="pt")),
                model.encode(**processor(text=[PASSAGES[0]], visual_feats=[feats[1]], return_tensors="pt")),
            ]
        )
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)
    assert st.similarity_fn_name == "dot"
    torch.testing.assert_close(st.similarity(got, got), got @ got.T, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no vision tower"):
        st.encode([{"text": QUESTIONS[0], "image": np.zeros((4, 7), dtype=np.float32)}])


def test_separate_towers_route_queries_and_passages(tokenizer, tmp_path):
    torch.manual_seed(2)
    config = JointEncoderConfig(**tiny_config_kwargs(vocab_size=len(tokenizer)))
    query_tower = randomize_(JointEncoderModel(config), seed=3).eval()
    passage_tower = randomize_(JointEncoderModel(config), seed=4).eval()
    model = JointEncoderBiEncoder.from_encoders(query_tower, passage_tower)
    processor = JointEncoderProcessor.from_model_config(config, tokenizer)
    model.save_pretrained(tmp_path)
    for tower in ("query_encoder", "passage_encoder"):
        processor.save_pretrained(tmp_path / tower)
    st = SentenceTransformer(str(tmp_path), trust_remote_code=True, device="cpu")
    feats = STORE["entity_1"]
    query = {"text": QUESTIONS[0], "image": feats}
    with torch.no_grad():
        q_batch = processor(
            text=[QUESTIONS[0]], visual_feats=[feats], return_tensors="pt", max_length=64, truncation=True
        )
        p_batch = processor(text=[PASSAGES[0]], return_tensors="pt", truncation=True)
        expected_q = query_tower.encode(**q_batch)
        expected_p = passage_tower.encode(**p_batch)
    torch.testing.assert_close(st.encode_query([query], convert_to_tensor=True), expected_q, atol=2e-6, rtol=0)
    torch.testing.assert_close(
        st.encode_document([PASSAGES[0]], convert_to_tensor=True), expected_p, atol=2e-6, rtol=0
    )
    assert not torch.allclose(expected_q, query_tower.encode(**processor(text=[QUESTIONS[0]], return_tensors="pt")))
    # each tower folder also loads on its own
    alone = SentenceTransformer(str(tmp_path / "query_encoder"), trust_remote_code=True, device="cpu")
    torch.testing.assert_close(alone.encode([query], convert_to_tensor=True), expected_q, atol=2e-6, rtol=0)


def brute_force_mrr(st, queries, kb):
    """MRR of the positive over the whole KB, exhaustive numpy scoring (independent of the loss code)."""
    q = st.encode_query([{"text": x["question"], "image": STORE[x["image"]]} for x in queries], convert_to_numpy=True)
    p = st.encode_document([{"text": x["text"], "image": STORE[x["image"]]} for x in kb], convert_to_numpy=True)
    return positive_mrr(q, p, queries, kb)


def st_training(tokenizer, tmp_path, loss_name: str, **overrides):
    """A shared-tower model loaded with SentenceTransformer, trained by SentenceTransformerTrainer on the package's
    data format (`sentence_transformers_dataset`): (model, MRR before, MRR after)."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses

    from vl_joint_encoder.training.sentence_transformers_data import sentence_transformers_dataset

    torch.manual_seed(0)
    model = JointEncoderModel(JointEncoderConfig(**tiny_config_kwargs(vocab_size=len(tokenizer))))
    JointEncoderProcessor.from_model_config(model.config, tokenizer).save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "base")
    st = SentenceTransformer(str(tmp_path / "base"), trust_remote_code=True, device="cpu")
    before = brute_force_mrr(st, QUERIES, KB)
    dataset = sentence_transformers_dataset(QUERIES, KB, feature_store=STORE, n_negatives=1)
    assert dataset.column_names == ["anchor", "positive", "negative_1"] and len(dataset) == len(QUERIES)
    loss = getattr(losses, loss_name)(st, **({"mini_batch_size": 3} if loss_name.startswith("Cached") else {}))
    kwargs = dict(output_dir=str(tmp_path / "out"), num_train_epochs=6, per_device_train_batch_size=8,
                  learning_rate=3e-3, use_cpu=True, report_to=[], save_strategy="no", logging_steps=100, seed=0,
                  disable_tqdm=True, batch_sampler="no_duplicates")  # fmt: skip
    kwargs.update(overrides)
    args = SentenceTransformerTrainingArguments(**kwargs)
    SentenceTransformerTrainer(model=st, args=args, train_dataset=dataset, loss=loss).train()
    return st, before, brute_force_mrr(st, QUERIES, KB)


def test_sentence_transformers_trainer_learns_on_our_data(tokenizer, tmp_path):
    st, before, after = st_training(tokenizer, tmp_path, "MultipleNegativesRankingLoss")
    # the image decides the entity: a text-only model is capped near H_8 / 8 = 0.34
    assert after > 0.6 and after > before + 0.3, (before, after)
    # what it trained is the package's model: saved by sentence-transformers, it loads with JointEncoderModel
    st.save(str(tmp_path / "trained"))
    again = JointEncoderModel.from_pretrained(str(tmp_path / "trained")).eval()
    processor = JointEncoderProcessor.from_pretrained(str(tmp_path / "trained"))
    query = QUERIES[0]
    with torch.no_grad():
        ours = again.encode(**processor(text=[query["question"]], visual_feats=[STORE[query["image"]]],
                                        return_tensors="pt", truncation=True, max_length=64))  # fmt: skip
    theirs = st.encode_query([{"text": query["question"], "image": STORE[query["image"]]}], convert_to_tensor=True)
    torch.testing.assert_close(theirs, ours, atol=2e-6, rtol=0)


def test_cached_mnrl_trains_as_mnrl(tokenizer, tmp_path):
    """CachedMultipleNegativesRankingLoss (GradCache in chunks of 3) through the module: the same 2 steps as MNRL."""
    weights = []
    for loss_name in ("MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss"):
        st, *_ = st_training(tokenizer, tmp_path / loss_name, loss_name, num_train_epochs=1, max_steps=2)
        weights.append({k: v.detach().clone() for k, v in st[0].model.state_dict().items()})
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], atol=1e-5, rtol=0, msg=name)
    initial = JointEncoderModel.from_pretrained(str(tmp_path / "MultipleNegativesRankingLoss" / "base")).state_dict()
    assert any(not torch.equal(initial[k], weights[0][k]) for k in initial)  # the two steps did train
