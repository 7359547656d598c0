"""matrixmagic.sharding: devices, meshes and what the compiler says, knowing nothing of training.

  mesh.py, validate.py   device meshes (data, fsdp, tensor; -1 fills) and their checks
  rules.py               the logical-axis rule table per layout
  partition.py           logical axes -> NamedShardings; tracing under the rule table
  memory.py              per-device bytes of a sharded tree, from shapes alone
  distributed.py         joining a multi-process job (TPU pods, SLURM, explicit)
  chips.py               TPU slices and GPUs: topologies, HBM, peak FLOP/s (cited)
  compiled.py            a compiled program's memory, FLOPs and out-of-memory, read
  plan.py                closed-form memory / FLOPs / time estimates, and `magic compile`'s report

May import matrixmagic.configs and matrixmagic.model: never train (train/run.py
composes the sharded train step from these parts).
"""
