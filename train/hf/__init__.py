"""matrixmagic.train.hf: Hugging Face GPT-2, BERT and Llama (Mistral) checkpoints in and out.

  api.py         import_hf(dir, workdir) / export_hf(workdir, out): the Python API (`magic hf`)
  config.py      config.json <-> ModelConfig, with an error for what we cannot express
  names.py       tensor names and shapes <-> our parameter tree (one table, both directions)
  checkpoint.py  the import plan (headers only), placing tensors into their shards, export
  tensorfile.py  the safetensors format: one tensor at a time in, streamed out; sharded index
  tokenizer.py   tokenizer.json / vocab.json + merges.txt / vocab.txt -> the run's tokenizer.json
  errors.py      HFError (a ConfigError: `magic` prints it cleanly)

Part of train: may import configs, model, sharding and the rest of train; needs
`tokenizers` and ml_dtypes, never torch or transformers.
"""
