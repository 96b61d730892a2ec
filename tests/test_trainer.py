import json
import os

import numpy as np
import pytest
import torch
from conftest import tiny_config_kwargs
from synthetic_retrieval import all_texts, make_task
from transformers import AutoModel, AutoTokenizer, TrainerCallback

from vl_joint_encoder import JointEncoderConfig, JointEncoderModel
from vl_joint_encoder.bi_encoder import JointEncoderBiEncoder
from vl_joint_encoder.data.inputs import JointEncoderInputBuilder
from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer
from vl_joint_encoder.training.arguments import JointEncoderTrainingArguments
from vl_joint_encoder.training.freezing import apply_freezing
from vl_joint_encoder.training.trainer import JointEncoderTrainer


QUERIES, KB, STORE = make_task(n_entities=8)


@pytest.fixture(scope="module")
def tokenizer():
    return train_vl_t5_tokenizer(all_texts(QUERIES, KB), vocab_size=120)


def new_model(tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    return JointEncoderModel(JointEncoderConfig(**tiny_config_kwargs(vocab_size=len(tokenizer), **overrides)))


def arguments(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=3e-3, use_cpu=True,
                  report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=4, n_hard_negatives=1, seed=0)
    kwargs.update(overrides)
    return JointEncoderTrainingArguments(**kwargs)


class BruteForceMRR:
    """MRR of the positive over the whole KB, exhaustive numpy scoring (independent of the loss code)."""

    def __init__(self, tokenizer, use_images=True, queries=QUERIES):
        self.inputs = JointEncoderInputBuilder(tokenizer, 64, STORE, use_images=use_images)
        self.queries = queries

    def __call__(self, query_model, passage_model=None):
        passage_model = passage_model or query_model
        q = query_model(**self.inputs([x["question"] for x in self.queries], [x["image"] for x in self.queries]))
        p = passage_model(**self.inputs([x["text"] for x in KB], [x["image"] for x in KB]))
        q = q.pooler_output.numpy()
        p = p.pooler_output.numpy()
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        p /= np.linalg.norm(p, axis=1, keepdims=True)
        scores = q @ p.T
        ids = [x["id"] for x in KB]
        reciprocal = []
        for i, query in enumerate(self.queries):
            j = ids.index(query["positive_ids"][0])
            reciprocal.append(1.0 / (1 + int((scores[i] >= scores[i, j]).sum()) - 1))
        return {"mrr": float(np.mean(reciprocal))}


@pytest.mark.slow
def test_short_training_learns_the_multimodal_task(tokenizer, tmp_path):
    """The image names the entity, the question the attribute: only a model that reads both reaches MRR ~1; a
    text-only model is capped near H_8 / 8 = 0.34 (the right attribute, a random entity)."""
    results = {}
    for name, use_images in (("multimodal", True), ("text_only", False)):
        model = new_model(tokenizer)
        evaluator = BruteForceMRR(tokenizer, use_images)
        with torch.no_grad():
            untrained = evaluator(model.eval())["mrr"]
        args = arguments(tmp_path / name, num_train_epochs=8, use_query_images=use_images,
                         use_passage_images=use_images, eval_strategy="steps", eval_steps=16)
        trainer = JointEncoderTrainer(model=model, args=args, train_dataset=QUERIES, kb=KB, processing_class=tokenizer,
                                      feature_store=STORE, evaluator=evaluator)
        trainer.train()
        results[name] = (untrained, trainer.evaluate()["eval_mrr"])
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert {"in_batch_accuracy", "in_batch_mrr"} <= set(logged[-1])
        assert sum("eval_mrr" in entry for entry in trainer.state.log_history) == 2 + 1  # eval_steps, then evaluate()
    (untrained_mm, trained_mm), (_, trained_text) = results["multimodal"], results["text_only"]
    assert untrained_mm < 0.3
    assert trained_mm > 0.9, results
    assert trained_text < 0.5, results
    assert trained_mm > trained_text + 0.4


class CrashAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated crash")


@pytest.mark.parametrize("separate_towers", [False, True])
def test_kill_and_resume_gives_the_uninterrupted_weights(tokenizer, tmp_path, separate_towers):
    queries = QUERIES[:16]  # 4 entities x 4 attributes; batch 4 -> 4 steps per epoch, the crash is mid-epoch 2
    common = dict(per_device_train_batch_size=4, max_steps=8, save_strategy="steps", save_steps=3,
                  separate_towers=separate_towers, learning_rate=1e-3)

    def trainer(out, model, callbacks=None):
        args = arguments(tmp_path, **{**common, "output_dir": str(tmp_path / out)})
        return JointEncoderTrainer(model=model, args=args, train_dataset=queries, kb=KB, processing_class=tokenizer,
                                   feature_store=STORE, callbacks=callbacks)

    dropout = {"dropout_rate": 0.1}  # dropout masks must replay too (RNG state in the checkpoint)
    straight = trainer("straight", new_model(tokenizer, **dropout))
    straight.train()
    assert straight.data_collator.epoch == 1  # 8 steps of 4 per epoch: negatives were re-drawn for epoch 1
    crashed = trainer("crashed", new_model(tokenizer, **dropout), callbacks=[CrashAt(7)])
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    assert sorted(os.listdir(tmp_path / "crashed")) == ["checkpoint-3", "checkpoint-6"]
    resumed = trainer("crashed", new_model(tokenizer, seed=123, **dropout))  # fresh process: other init weights
    resumed.train(resume_from_checkpoint=str(tmp_path / "crashed" / "checkpoint-6"))
    expected, got = straight.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    fresh = new_model(tokenizer, **dropout).state_dict()
    prefix = "query_encoder." if separate_towers else ""
    assert not torch.equal(expected[prefix + "shared.weight"], fresh["shared.weight"])  # it did train


def test_separate_towers_save_and_load_with_automodel(tokenizer, tmp_path):
    args = arguments(tmp_path, max_steps=3, separate_towers=True, freeze_first_n_blocks=1)
    trainer = JointEncoderTrainer(model=new_model(tokenizer), args=args, train_dataset=QUERIES, kb=KB,
                                  processing_class=tokenizer, feature_store=STORE)
    trainer.train()
    model = trainer.model
    assert isinstance(model, JointEncoderBiEncoder)
    out = trainer.save_final_model(str(tmp_path / "final"), results={"mrr": 0.5}, data_description="synthetic")
    assert {"query_encoder", "passage_encoder", "README.md"} <= set(os.listdir(out))
    card = open(os.path.join(out, "README.md")).read()
    assert "Separate towers" in card and "| mrr | 0.5 |" in card and "n_hard_negatives | `1`" in card
    for tower in ("query_encoder", "passage_encoder"):
        loaded = AutoModel.from_pretrained(os.path.join(out, tower), trust_remote_code=True)
        for key, value in getattr(model, tower).state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), (tower, key)
    # the towers trained apart from a common start; frozen first block stayed equal in both
    assert not torch.equal(model.query_encoder.shared.weight, model.passage_encoder.shared.weight)
    q_block, p_block = model.query_encoder.block[0].state_dict(), model.passage_encoder.block[0].state_dict()
    assert all(torch.equal(q_block[k], p_block[k]) for k in q_block)
    for tower in ("query_encoder", "passage_encoder"):
        assert AutoTokenizer.from_pretrained(os.path.join(out, tower)).get_vocab() == tokenizer.get_vocab()


def test_shared_tower_final_save_has_remote_code_and_card(tokenizer, tmp_path):
    args = arguments(tmp_path, max_steps=2)
    trainer = JointEncoderTrainer(model=new_model(tokenizer), args=args, train_dataset=QUERIES, kb=KB,
                                  processing_class=tokenizer, feature_store=STORE)
    trainer.train()
    out = trainer.save_final_model(str(tmp_path / "final"))
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "modeling_joint_encoder.py", "README.md", "tokenizer_config.json"} <= files
    assert "training_args.bin" not in files  # no pickle in a released model folder: the arguments are JSON
    with open(os.path.join(out, "training_args.json")) as handle:
        assert json.load(handle)["n_hard_negatives"] == args.n_hard_negatives
    card = open(os.path.join(out, "README.md")).read()
    assert "One shared tower" in card and "| queries | 32 |" in card and "No evaluation was run" in card
    # with results, they are stated in the card and in its model-index metadata (read by the Hub)
    out = trainer.save_final_model(str(tmp_path / "final_with_results"), results={"eval_mrr@10": 0.625})
    from huggingface_hub import ModelCard

    card = ModelCard.load(os.path.join(out, "README.md"))
    [result] = card.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_split) == ("mrr@10", 0.625, "eval")


def test_arguments_that_contradict_the_model_are_refused(tokenizer, tmp_path):
    model = new_model(tokenizer)  # cosine, logit_scale 20
    for overrides, message in (({"similarity": "dot"}, "similarity='dot' in the arguments"),
                               ({"logit_scale": 1.0}, "logit_scale=1.0 in the arguments")):
        with pytest.raises(ValueError, match=message):
            JointEncoderTrainer(model=model, args=arguments(tmp_path, **overrides), train_dataset=QUERIES, kb=KB,
                                processing_class=tokenizer)
    JointEncoderTrainer(model=model, args=arguments(tmp_path, similarity="cosine", logit_scale=20.0),
                        train_dataset=QUERIES, kb=KB, processing_class=tokenizer)
    with pytest.raises(ValueError, match="no negative at all"):
        arguments(tmp_path, per_device_train_batch_size=1, n_hard_negatives=0)
    with pytest.raises(ValueError, match="train_only must be one of"):
        arguments(tmp_path, train_only="everything")
    with pytest.raises(ValueError, match="pass kb="):
        JointEncoderTrainer(model=model, args=arguments(tmp_path), train_dataset=QUERIES, processing_class=tokenizer)


def test_freezing_options(tokenizer):
    from transformers import CLIPVisionConfig

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16)
    model = new_model(tokenizer, adapter_reduction_factor=4, projection_dim=8, vision_config=vision)

    def trainable():
        return {name for name, p in model.named_parameters() if p.requires_grad}

    apply_freezing(model)
    assert not any(name.startswith("vision_model.") for name in trainable())  # CLIP tower: always frozen
    everything = trainable()
    apply_freezing(model, freeze_token_embeddings=True, freeze_first_n_blocks=1)
    assert everything - trainable() == {n for n in everything if n == "shared.weight" or n.startswith("block.0.")}
    model.requires_grad_(True)
    apply_freezing(model, train_only="adapters")
    expected = {n for n in everything if ".adapter." in n or "layer_norm" in n or n.startswith("visual_embedding.")
                or n.startswith("projection.")}
    assert trainable() == expected and not any(n.startswith("vision_model.") for n in trainable())
    model.requires_grad_(True)
    apply_freezing(model, train_only="projection")
    assert trainable() == {"projection.weight", "projection.bias"}
    with pytest.raises(ValueError, match="needs a model with adapters"):
        apply_freezing(new_model(tokenizer), train_only="adapters")
    with pytest.raises(ValueError, match="has 2 blocks"):
        apply_freezing(new_model(tokenizer), freeze_first_n_blocks=3)


@pytest.mark.parametrize("separate_towers", [False, True])
def test_grad_cache_training_matches_plain_training(tokenizer, tmp_path, separate_towers):
    """Two optimizer steps with GradCache (chunks of 3 rows) land on the same weights as plain steps."""
    weights = {}
    for grad_cache in (False, True):
        args = arguments(tmp_path / str(grad_cache), max_steps=2, grad_cache=grad_cache, grad_cache_chunk_size=3,
                         separate_towers=separate_towers, optim="sgd", learning_rate=0.5, gradient_accumulation_steps=2,
                         per_device_train_batch_size=5, logging_steps=1)
        trainer = JointEncoderTrainer(model=new_model(tokenizer), args=args, train_dataset=QUERIES, kb=KB,
                                      processing_class=tokenizer, feature_store=STORE)
        trainer.train()
        weights[grad_cache] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert len(losses) == 2
        weights[f"loss{grad_cache}"] = losses
    start = new_model(tokenizer).state_dict()
    prefix = "query_encoder." if separate_towers else ""
    assert not torch.equal(weights[True][prefix + "shared.weight"], start["shared.weight"])
    for key, value in weights[False].items():
        torch.testing.assert_close(weights[True][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert weights["lossTrue"] == pytest.approx(weights["lossFalse"], rel=1e-5)
