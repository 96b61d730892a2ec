"""The trained model's card (training/model_card.py): named after the final folder, numbers from the run, and a
usage snippet that runs as written where the package is not installed: shared and separate towers, with a tokenizer
only (features go to the model). The demo's card (processor + image) is tested in test_demo.py, built ones in
test_build.py."""

import os
import subprocess
import sys

import torch
from conftest import tiny_config_kwargs
from synthetic_retrieval import all_texts, make_task

from vl_joint_encoder import JointEncoderConfig, JointEncoderModel
from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer
from vl_joint_encoder.training.arguments import JointEncoderTrainingArguments
from vl_joint_encoder.training.trainer import JointEncoderTrainer


def test_trained_cards_of_both_tower_layouts_have_snippets_that_run(tmp_path):
    queries, kb, store = make_task(n_entities=4)
    tokenizer = train_vl_t5_tokenizer(all_texts(queries, kb), vocab_size=80)
    snippets = []
    for separate in (False, True):
        torch.manual_seed(0)
        model = JointEncoderModel(JointEncoderConfig(**tiny_config_kwargs(vocab_size=len(tokenizer))))
        args = JointEncoderTrainingArguments(
            output_dir=str(tmp_path / f"run-{separate}"), max_steps=3, per_device_train_batch_size=4, use_cpu=True,
            report_to=[], save_strategy="no", logging_steps=1, separate_towers=separate, n_hard_negatives=2,
            disable_tqdm=True,
        )  # fmt: skip
        trainer = JointEncoderTrainer(model=model, args=args, train_dataset=queries, kb=kb, processing_class=tokenizer,
                                      feature_store=store)  # fmt: skip
        trainer.train()
        staging, final = tmp_path / f"staging-{separate}", tmp_path / f"encoder-{separate}"
        trainer.save_final_model(str(staging), final_dir=str(final))
        os.replace(staging, final)
        card = (final / "README.md").read_text()
        assert f"\n# encoder-{separate}\n" in card and "staging" not in card
        assert "| steps trained | 3 (" in card and "| global batch | 4 queries" in card
        assert "| hard negatives drawn per query and step | 2 |" in card
        assert "| hard-negative candidates per query (mean) | 2.00 |" in card  # make_task gives 2 per query
        assert ("Separate towers" in card) == separate
        snippets.append(card.split("```python\n", 1)[1].split("```", 1)[0])
    assert "passage_encoder.encode" in snippets[1] and "AutoTokenizer" in snippets[0]
    script = "import sys\nsys.modules['vl_joint_encoder'] = None\n" + "\n".join(snippets)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("torch.Size([1, 32])") == 2
