"""Data: tables of queries and passages, image references, feature stores, images -> model inputs.

- `tables`: `ColumnMapping`, the one reader of queries and KB (`read_queries`, `read_knowledge_base`), training data
  (`prepare_training_data`), qrels from positives;
- `references`: what an `image` cell points to, checked before use and resolved at batch time;
- `feature_stores`: precomputed visual features by key (one protocol, one opener for every layout);
- `inputs`: `JointEncoderInputBuilder`, the batch builder of training and inference;
- `extraction`: the `extract-features` job; `report`: the `data-report` statistics.
"""
