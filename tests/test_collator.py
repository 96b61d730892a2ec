import numpy as np
import pytest
import torch

from vl_joint_encoder.data.tables import prepare_training_data
from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer
from vl_joint_encoder.training.collator import ContrastiveCollator


KB = [{"id": f"p{i}", "text": f"passage p{i} about topic {i}", "image": f"e{i % 2}"} for i in range(8)]
QUERIES = [
    {"id": "qa", "question": "first question", "image": "e0", "positive_ids": ["p0", "p1"],
     "negative_ids": ["p2", "p3", "p4", "p1"]},
    {"id": "qb", "question": "second question here", "image": None, "positive_ids": ["p1"], "negative_ids": ["p0"]},
    {"id": "qc", "question": "third", "image": "e1", "positive_ids": ["p5"], "negative_ids": []},
]
STORE = {"e0": np.arange(12, dtype=np.float32).reshape(3, 4), "e1": -np.ones((2, 4), np.float32)}


@pytest.fixture(scope="module")
def tokenizer():
    return train_vl_t5_tokenizer([q["question"] for q in QUERIES] + [p["text"] for p in KB] * 3, vocab_size=60)


def make_collator(tokenizer, **kwargs):
    data = prepare_training_data(QUERIES, KB)
    kwargs = {"n_hard_negatives": 2, "seed": 3, "feature_store": STORE, **kwargs}
    return data, ContrastiveCollator(data, tokenizer, **kwargs)


def decoded_ids(tokenizer, input_ids):
    texts = tokenizer.batch_decode(input_ids, skip_special_tokens=True)
    return [text.split()[1] for text in texts]  # "passage pK about topic K" -> "pK"


def test_groups_layout_and_false_negative_keys_by_hand(tokenizer):
    data, collator = make_collator(tokenizer)
    rows = [data.queries[i] for i in range(3)]
    batch = collator(rows)
    assert batch["positive_index"].tolist() == [0, 3, 6]
    ids = decoded_ids(tokenizer, batch["passage"]["input_ids"])  # what the model really reads
    groups = [ids[0:3], ids[3:6], ids[6:9]]
    raw_positives = {q["id"]: set(q["positive_ids"]) for q in QUERIES}
    for query, group in zip(QUERIES, groups):
        assert group[0] in raw_positives[query["id"]]
        assert len(set(group)) == 3 and not set(group[1:]) & raw_positives[query["id"]]
    assert set(groups[0][1:]) <= {"p2", "p3", "p4"}  # enough hard negatives: only those
    assert "p0" in groups[1][1:]  # qb has one hard negative: it, then one random passage
    # keys: KB rows; here row k holds id pk
    assert batch["passage_keys"].tolist() == [int(i[1:]) for i in ids]
    assert batch["query_positive_keys"].tolist() == [[0, 1], [1, -1], [5, -1]]
    # the false negatives the loss will mask, from the keys, equal those found by reading the texts
    keys, positive_keys = batch["passage_keys"], batch["query_positive_keys"]
    from_keys = (keys[None, :, None] == positive_keys[:, None, :]).any(-1)  # (Q, P)
    from_keys[torch.arange(3), batch["positive_index"]] = False
    by_hand = torch.tensor([[pid in raw_positives[q["id"]] for pid in ids] for q in QUERIES])
    by_hand[torch.arange(3), batch["positive_index"]] = False
    assert torch.equal(from_keys, by_hand)


def test_sampling_is_reproducible_and_changes_with_epoch(tokenizer):
    data, collator = make_collator(tokenizer)
    rows = [data.queries[i] for i in range(3)]
    first = collator(rows)["passage_keys"].tolist()
    # the same query gets the same group whatever the batch around it, and in a fresh collator
    alone = make_collator(tokenizer)[1]([rows[2]])["passage_keys"].tolist()
    assert alone == first[6:9]
    assert collator(rows[::-1])["passage_keys"].tolist()[0:3] == first[6:9]
    epochs = set()
    for epoch in range(6):
        collator.epoch = epoch
        epochs.add(tuple(collator(rows)["passage_keys"].tolist()))
    assert len(epochs) > 1
    _, other_seed = make_collator(tokenizer, seed=4)
    assert other_seed(rows)["passage_keys"].tolist() != first


def test_text_and_visual_inputs(tokenizer):
    data, collator = make_collator(tokenizer, query_max_length=3)
    batch = collator([data.queries[i] for i in range(3)])
    query = batch["query"]
    expected = tokenizer(["first question", "second question here", "third"], truncation=True, max_length=3)
    for i, ids in enumerate(expected["input_ids"]):
        assert query["input_ids"][i, : len(ids)].tolist() == ids
        assert query["attention_mask"][i].sum() == len(ids)
    assert query["visual_feats"].shape == (3, 3, 4)
    assert torch.equal(query["visual_feats"][0], torch.from_numpy(STORE["e0"]))
    assert query["visual_attention_mask"].tolist() == [[1, 1, 1], [0, 0, 0], [1, 1, 0]]
    assert torch.equal(query["visual_feats"][2, :2], torch.from_numpy(STORE["e1"]))
    # passages carry their entity image: row k has e{k % 2}
    passage = batch["passage"]
    for j, key in enumerate(batch["passage_keys"].tolist()):
        n = int(passage["visual_attention_mask"][j].sum())
        assert torch.equal(passage["visual_feats"][j, :n], torch.from_numpy(STORE[f"e{key % 2}"]))
    text_only = make_collator(tokenizer, use_query_images=False, use_passage_images=False)[1]
    batch = text_only([data.queries[i] for i in range(3)])
    assert "visual_feats" not in batch["query"] and "visual_feats" not in batch["passage"]


def test_image_problems_are_named(tokenizer, tmp_path):
    data = prepare_training_data([{**QUERIES[0], "image": "missing.jpg"}], KB)
    collator = ContrastiveCollator(data, tokenizer, feature_store=STORE, image_root=str(tmp_path))
    with pytest.raises(ValueError, match="missing.jpg' does not exist"):
        collator([data.queries[0]])
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "real.jpg")
    data = prepare_training_data([{**QUERIES[0], "image": "real.jpg"}], KB)
    collator = ContrastiveCollator(data, tokenizer, feature_store=STORE, image_root=str(tmp_path))
    with pytest.raises(ValueError, match="no JointEncoderProcessor"):
        collator([data.queries[0]])
    with pytest.raises(ValueError, match="n_hard_negatives=8 needs a KB of more than 8"):
        ContrastiveCollator(data, tokenizer, n_hard_negatives=8)


def test_real_photos_through_the_processor_and_a_vision_tower(tokenizer):
    """A datasets.Image column of real photos stays undecoded until collate time, then goes through
    JointEncoderProcessor into pixel_values that a model with a (tiny, random) CLIP tower encodes."""
    import datasets
    from conftest import tiny_config_kwargs
    from PIL import Image
    from skimage import data as photos
    from transformers import CLIPVisionConfig

    from vl_joint_encoder import JointEncoderConfig, JointEncoderModel
    from vl_joint_encoder.processing_joint_encoder import JointEncoderProcessor, image_processor_for_config

    queries = datasets.Dataset.from_list(
        [{"id": "qa", "question": "who is she?", "image": Image.fromarray(photos.astronaut()), "positive_ids": ["p0"]},
         {"id": "qb", "question": "what drink?", "image": Image.fromarray(photos.coffee()), "positive_ids": ["p1"]}]
    )
    kb = [{"id": f"p{i}", "text": f"passage p{i} about topic {i}"} for i in range(4)]
    data = prepare_training_data(queries, kb)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=64, patch_size=32)
    config = JointEncoderConfig(**tiny_config_kwargs(vocab_size=len(tokenizer), vision_config=vision))
    processor = JointEncoderProcessor(image_processor=image_processor_for_config(config), tokenizer=tokenizer,
                                      feat_dim=16)
    collator = ContrastiveCollator(data, processor, n_hard_negatives=1)
    batch = collator([data.queries[0], data.queries[1]])
    assert batch["query"]["pixel_values"].shape == (2, 1, 3, 64, 64)
    assert "pixel_values" not in batch["passage"]  # text-only passages
    model = JointEncoderModel(config).eval()
    with torch.no_grad():
        embeddings = model(**batch["query"]).pooler_output
    assert embeddings.shape == (2, 32) and torch.isfinite(embeddings).all()
    assert not torch.allclose(embeddings[0], embeddings[1])
