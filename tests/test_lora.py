"""LoRA (PEFT) training of the joint encoder: only the adapter weights change, retrieval improves, the adapter saves
in PEFT's format and loads with `PeftModel.from_pretrained`, the merged model computes what the adapter model does,
GradCache and a 2-process `accelerate launch` give the same training as one process on the concatenated batch."""

import json

import pytest
import torch
from conftest import tiny_config_kwargs
from safetensors.torch import load_file
from synthetic_retrieval import all_texts, make_task, positive_mrr, write_training_folder


peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402

from vl_joint_encoder import JointEncoderConfig, JointEncoderModel  # noqa: E402
from vl_joint_encoder.data.inputs import JointEncoderInputBuilder  # noqa: E402
from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer  # noqa: E402
from vl_joint_encoder.training.arguments import JointEncoderTrainingArguments  # noqa: E402
from vl_joint_encoder.training.lora import save_merged, wrap_with_lora  # noqa: E402
from vl_joint_encoder.training.trainer import JointEncoderTrainer  # noqa: E402


QUERIES, KB, STORE = make_task(n_entities=8)


@pytest.fixture(scope="module")
def tokenizer():
    return train_vl_t5_tokenizer(all_texts(QUERIES, KB), vocab_size=120)


def new_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    return JointEncoderModel(JointEncoderConfig(**tiny_config_kwargs(vocab_size=len(tokenizer))))


def arguments(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=1e-2, use_cpu=True,
                  report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=4, n_hard_negatives=1, seed=0,
                  lora_r=4)  # fmt: skip
    kwargs.update(overrides)
    return JointEncoderTrainingArguments(**kwargs)


def mrr(model, tokenizer):
    """MRR of the positive over the whole KB, exhaustive numpy scoring (independent of the loss code)."""
    inputs = JointEncoderInputBuilder(tokenizer, 64, STORE)
    with torch.no_grad():
        q = model(**inputs([x["question"] for x in QUERIES], [x["image"] for x in QUERIES])).pooler_output.numpy()
        p = model(**inputs([x["text"] for x in KB], [x["image"] for x in KB])).pooler_output.numpy()
    return positive_mrr(q, p, QUERIES, KB)


def batch(tokenizer, rows=KB[:6]):
    return JointEncoderInputBuilder(tokenizer, 64, STORE)([x["text"] for x in rows], [x["image"] for x in rows])


def base_weights(peft_model):
    """The base model's own weights (not LoRA, not the trained copies of modules_to_save), by base-model name."""
    out = {}
    for name, tensor in peft_model.state_dict().items():
        if "lora_" in name or ".modules_to_save." in name:
            continue
        out[name.removeprefix("base_model.model.").replace(".original_module", "")] = tensor.detach().clone()
    return out


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    """(base folder, trainer, weights before, MRR before, MRR after): LoRA r=4 on the synthetic task."""
    tmp = tmp_path_factory.mktemp("lora")
    model = new_model(tokenizer)
    model.save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    model = JointEncoderModel.from_pretrained(tmp / "base")
    before_mrr = mrr(model.eval(), tokenizer)
    trainer = JointEncoderTrainer(model=model, args=arguments(tmp, num_train_epochs=10), train_dataset=QUERIES, kb=KB,
                                  processing_class=tokenizer, feature_store=STORE)  # fmt: skip
    before = base_weights(trainer.model)
    lora_before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_B" in k}
    trainer.train()
    trainer.model.eval()
    return tmp, trainer, before, lora_before, before_mrr, mrr(trainer.model, tokenizer)


def test_lora_trains_only_the_adapter_and_learns(trained):
    tmp, trainer, before, lora_before, before_mrr, after_mrr = trained
    model = trainer.model
    assert isinstance(model, PeftModel)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or ".modules_to_save." in name for name in trainable), trainable
    assert not any("vision_model" in name for name in trainable)
    after = base_weights(model)
    assert after.keys() == before.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed == [], changed  # the base model's weights are bit-identical
    assert all(not torch.equal(lora_before[k], v) for k, v in model.state_dict().items() if "lora_B" in k)
    # LoRA on attention + the visual embedding: the image-dependent task is learnt (text only is capped near 0.34)
    assert after_mrr > 0.7 and after_mrr > before_mrr + 0.3, (before_mrr, after_mrr)


def test_adapter_saves_alone_loads_with_peft_and_merges(trained, tokenizer):
    tmp, trainer, *_ = trained
    out = tmp / "final"
    trainer.save_final_model(str(out))
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()  # the adapter alone: a few tensors, not the encoder
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    inputs = batch(tokenizer)
    with torch.no_grad():
        expected = trainer.model(**inputs).pooler_output
    loaded = PeftModel.from_pretrained(JointEncoderModel.from_pretrained(tmp / "base"), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).pooler_output, expected, atol=1e-6, rtol=0)
    save_merged(trainer.model, tmp / "merged", tokenizer)
    merged = JointEncoderModel.from_pretrained(tmp / "merged").eval()
    assert not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).pooler_output, expected, atol=1e-5, rtol=0)
    assert isinstance(trainer.model, PeftModel)  # merging worked on a copy


def lora_weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k or ".modules_to_save." in k}


def test_grad_cache_gives_the_same_lora_training(tokenizer, tmp_path):
    results = []
    for grad_cache in (False, True):
        args = arguments(tmp_path / str(grad_cache), max_steps=2, grad_cache=grad_cache, grad_cache_chunk_size=3,
                         learning_rate=1e-3)  # fmt: skip
        trainer = JointEncoderTrainer(model=new_model(tokenizer), args=args, train_dataset=QUERIES, kb=KB,
                                      processing_class=tokenizer, feature_store=STORE)  # fmt: skip
        trainer.train()
        results.append(lora_weights(trainer.model))
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], atol=1e-5, rtol=0, msg=name)


def test_wrapping_errors_name_the_fix(tokenizer):
    model = new_model(tokenizer)
    with pytest.raises(ValueError, match="no linear layer of the encoder is named 'query'"):
        wrap_with_lora(model, 4, target_modules=["query"])
    # a preset names the layers of either feed-forward variant (wi, or wi_0 + wi_1): the absent ones are dropped
    wrapped = wrap_with_lora(new_model(tokenizer), 2, target_modules=["all-linear"])
    wrapped_layers = {
        name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in wrapped.named_parameters() if "lora_A" in name
    }
    assert wrapped_layers == {"q", "k", "v", "o", "wi", "wo", "0"}, wrapped_layers
    with pytest.raises(ValueError, match="lora_merge needs lora_r"):
        JointEncoderTrainingArguments(output_dir="x", lora_merge=True, use_cpu=True)
    with pytest.raises(ValueError, match="drop train_only"):
        JointEncoderTrainingArguments(output_dir="x", lora_r=4, train_only="projection", use_cpu=True)


@pytest.fixture(scope="module")
def workdir(tokenizer, tmp_path_factory):
    return write_training_folder(tmp_path_factory.mktemp("lora-cli"), new_model(tokenizer), tokenizer, QUERIES, KB, STORE)


def cli_config(workdir, out, **overrides):
    cfg = {
        "model_name_or_path": str(workdir / "model"), "train_queries": [str(workdir / "queries.jsonl")],
        "kb": [str(workdir / "kb.parquet")], "feature_store": str(workdir / "features.npz"), "output_dir": str(out),
        "use_cpu": True, "per_device_train_batch_size": 8, "max_steps": 2, "logging_steps": 1, "save_strategy": "no",
        "report_to": [], "disable_tqdm": True, "learning_rate": 1e-3, "lora_r": 4, "lora_alpha": 8,
        "lora_target_modules": ["attention", "wo"], "seed": 0,
    }  # fmt: skip
    cfg.update(overrides)
    return cfg


def test_train_command_with_lora(workdir, tmp_path):
    from vl_joint_encoder.commands.train import main

    path = tmp_path / "train.json"
    path.write_text(json.dumps(cli_config(workdir, tmp_path / "out", lora_merge=True)))
    assert main([str(path)]) == 0
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file() and (out / "merged" / "model.safetensors").is_file()
    adapter = load_file(out / "adapter_model.safetensors")
    assert any(".wo.lora_A" in k for k in adapter) and any(".q.lora_A" in k for k in adapter)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = next(entry for entry in history if "params_trainable" in entry)
    assert 0 < logged["params_trainable"] < logged["params_total"] and logged["cpu_peak_rss_mib"] > 0


# 2-process LoRA training (plain and GradCache) equal to one process on the concatenated batch: the LoRA rows of
# the data-parallel matrix, tests/test_trainer_distributed.py (one 2-process launch for every configuration)
