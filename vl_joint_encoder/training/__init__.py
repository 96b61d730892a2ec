"""Training a joint encoder as a dense retriever with transformers' `Trainer`.

- `arguments`: `JointEncoderTrainingArguments`; `collator`: reproducible groups of 1 positive + n hard negatives;
- `loss`: `InBatchContrastiveLoss` (DPR / InfoNCE, false negatives masked); `grad_cache`: GradCache;
  `distributed`: gathers with gradients across processes; `freezing`: which parameters train;
- `trainer`: `JointEncoderTrainer`; `model_card`: the card of a trained model.
"""
