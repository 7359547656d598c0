"""Input data: the corpus (a TFDS array_record dataset, or text/JSONL/Parquet files), the
tokenizers, token shards (`magic data prepare`: prepare.py, shards.py), mixtures, and the
packed, step-addressed batch pipeline (grain).

May import matrixmagic.configs and matrixmagic.model (the family records say which
features each family's batch holds) and train/storage.py (the run-path gate, itself a
leaf: a source, data dir or tokenizer may be a gs:// URL); never sharding or the rest of train.
"""
