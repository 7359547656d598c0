"""matrixmagic.train: everything that makes a run, on top of configs, model and sharding.

  run.py          THE run: its config (`resolve_config`, shared by magic train and magic
                  compile), the vocabulary, the sharded state and the jitted steps
  step.py         the train step and eval step (pure functions of state and batch)
  optimizer.py, schedules.py, state.py   AdamW, learning-rate schedules, the train state
  loop.py         `magic train`: data, steps, evals, checkpoints, metrics
  aot.py          the AOT lowering of that same step; serialized executables
  checkpoint.py, integrity.py, resume.py, guards.py, preemption.py   saving and resuming safely
  runlock.py, samerun.py, quiet.py   one writer per run, a resume that is the same run,
                  library noise kept off the console
  metrics.py      logs, TensorBoard, the loss curve, MFU against a measured peak
  data/           the corpus, tokenizers and the step-addressed batch pipeline
  cli/            the `magic` command (the only place that imports lazily, for start-up time)

May import every other matrixmagic package; nothing imports it.
"""
