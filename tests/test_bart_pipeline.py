"""A converted VL-Adapter-BART checkpoint trains, encodes and searches through the same commands as a VL-T5 one:
`convert` (with a bart-base-style tokenizer, so the folder holds the processor and its text prefix), `train` with
VL-Adapter's freezing (adapters + visual embedding + LayerNorms), then `encode` and `search` with a feature store of
7x7 grids; the KB embeddings equal the trained model fed inputs built here by hand (`<s> vqa: ... </s>` ids, the
`input_ids != pad` mask, the store's arrays), and the run equals brute-force search over them."""

import json

import numpy as np
import pytest
import torch
import yaml
from synthetic_retrieval import make_task
from vl_bart_fixtures import TINY, build_tiny_bart_tokenizer, save_checkpoint, vl_adapter_bart_state_dict

from conversion.convert_vl_t5_checkpoint import convert
from vl_joint_encoder import JointEncoderModel
from vl_joint_encoder.commands import encode as encode_command
from vl_joint_encoder.commands import search as search_command
from vl_joint_encoder.commands import train as train_command
from vl_joint_encoder.retrieval.store import EmbeddingStore


@pytest.mark.slow  # convert + train + encode + search: ~20 s on 2 busy cores
def test_convert_train_encode_search_a_vl_adapter_bart_model(tmp_path):
    build_tiny_bart_tokenizer(with_extra_tokens=False).save_pretrained(tmp_path / "bart-base")
    state = vl_adapter_bart_state_dict(seed=0, use_single_adapter=True)  # single_adapter.sh: task prompts
    convert(save_checkpoint(state, tmp_path / "LAST.pth"), tmp_path / "model", adapter_task="vqa",
            num_heads=TINY["num_heads"], tokenizer=str(tmp_path / "bart-base"))
    queries, kb, store = make_task(n_entities=4, feat_dim=TINY["feat_dim"], n_visual=49)
    np.savez(tmp_path / "features.npz", **store)
    with open(tmp_path / "queries.jsonl", "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in queries)
    with open(tmp_path / "kb.jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in kb)

    config = {
        "model_name_or_path": str(tmp_path / "model"), "train_queries": [str(tmp_path / "queries.jsonl")],
        "kb": [str(tmp_path / "kb.jsonl")], "feature_store": str(tmp_path / "features.npz"),
        "output_dir": str(tmp_path / "trained"), "use_cpu": True, "per_device_train_batch_size": 4, "max_steps": 3,
        "logging_steps": 1, "save_strategy": "no", "report_to": [], "disable_tqdm": True, "learning_rate": 1e-2,
        "train_only": "adapters", "freeze_first_n_blocks": 1,
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    assert train_command.main([str(tmp_path / "train.yaml")]) == 0
    before = JointEncoderModel.from_pretrained(tmp_path / "model")
    trained = JointEncoderModel.from_pretrained(tmp_path / "trained").eval()
    assert trained.config.backbone == "bart" and trained.config.text_prefix == "vqa: "
    changed = {n for n, p in trained.state_dict().items() if not torch.equal(p, before.state_dict()[n])}
    assert changed and all(  # VL-Adapter's freezing: adapters, visual embedding, LayerNorms; block 0 frozen too
        n.startswith("visual_embedding.") or ("_adapter." in n and not n.startswith("layers.0."))
        or n.startswith("layernorm_embedding.") or (n.startswith("layers.1.") and "layer_norm" in n)
        for n in changed
    ), sorted(changed)
    assert any(n.startswith("layers.1.attn_adapter.") for n in changed)
    assert not any(n.startswith("layers.0.") or n in ("shared.weight", "embed_positions.weight") for n in changed)

    model = str(tmp_path / "trained")
    store_path = str(tmp_path / "features.npz")
    assert encode_command.main(["--model", model, "--kb", str(tmp_path / "kb.jsonl"), "--output-dir",
                                str(tmp_path / "emb"), "--feature-store", store_path, "--batch_size", "5",
                                "--cpu"]) == 0  # fmt: skip
    assert search_command.main(["--model", model, "--queries", str(tmp_path / "queries.jsonl"), "--embeddings",
                                str(tmp_path / "emb"), "--feature_store", store_path, "--output",
                                str(tmp_path / "run.json"), "--k", "5", "--device", "cpu"]) == 0  # fmt: skip

    tokenizer = build_tiny_bart_tokenizer()

    @torch.no_grad()
    def by_hand(text, key):
        ids = torch.tensor([tokenizer.encode("vqa: " + text)])  # <s> vqa: ... </s>, as the original loaders
        out = trained(input_ids=ids, attention_mask=(ids != 1).long(), visual_feats=torch.from_numpy(store[key])[None])
        return torch.nn.functional.normalize(out.pooler_output, dim=-1)[0].numpy()

    kb_ref = np.stack([by_hand(p["text"], p["image"]) for p in kb])
    stored = EmbeddingStore(tmp_path / "emb")
    ids = stored.ids
    vectors = stored.load_all()[0].float().numpy()
    order = [ids.index(p["id"]) for p in kb]
    np.testing.assert_allclose(vectors[order], kb_ref, atol=1e-5)
    run = json.loads((tmp_path / "run.json").read_text())
    for q in queries[:6]:
        scores = kb_ref @ by_hand(q["question"], q["image"])
        best = [kb[i]["id"] for i in np.argsort(-scores)[:5]]
        assert list(run[q["id"]])[:3] == best[:3], q["id"]


def test_bart_tokenizer_trainer_and_the_demo_model_with_a_vision_tower(tmp_path):
    """`train_vl_bart_tokenizer` gives the layout the fixtures build by hand (same vocabulary and ids), and the demo's
    tiny model with backbone="bart" runs images through its frozen CLIP tower and BART layers, and reloads."""
    from PIL import Image
    from transformers import AutoModel, AutoProcessor
    from vl_bart_fixtures import CORPUS

    from vl_joint_encoder.demo.tiny_model import TinyModelSize, build_tiny_model
    from vl_joint_encoder.tokenization_joint_encoder import check_vl_bart_layout, train_vl_bart_tokenizer

    trained, by_hand = train_vl_bart_tokenizer(CORPUS * 4, vocab_size=300), build_tiny_bart_tokenizer()
    assert trained.get_vocab() == by_hand.get_vocab()
    assert trained.encode("nlvr: two <pad> dogs") == by_hand.encode("nlvr: two <pad> dogs")
    check_vl_bart_layout(trained, 500)
    model, processor = build_tiny_model(CORPUS * 4, TinyModelSize(backbone="bart", vocab_size=300))
    assert model.config.backbone == "bart" and len(processor.tokenizer) == model.config.vocab_size == 500
    photo = Image.fromarray((np.random.default_rng(0).uniform(size=(40, 48, 3)) * 255).astype(np.uint8))
    batch = processor(text=["what color is the sofa", "a cat"], images=[photo, None], return_tensors="pt")
    with torch.no_grad():
        out = model.eval()(**batch)
        features = model.get_image_features(batch["pixel_values"][:1])
        again = model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1], **features)
    torch.testing.assert_close(again.pooler_output[0], out.pooler_output[0], atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded, reprocessor = AutoModel.from_pretrained(tmp_path).eval(), AutoProcessor.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**reprocessor(text=["a cat"], return_tensors="pt")).pooler_output,
                           model(**processor(text=["a cat"], return_tensors="pt")).pooler_output)
