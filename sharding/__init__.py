"""matrixmagic.sharding: devices, meshes and partitioning, knowing nothing of training.

  mesh.py, validate.py   device meshes (data, fsdp, tensor; -1 fills) and their checks
  rules.py               the logical-axis rule table per layout
  partition.py           logical axes -> NamedShardings; tracing under the rule table
  memory.py              per-device bytes of a sharded tree, from shapes alone
  distributed.py         joining a multi-process job (TPU pods, SLURM, explicit)

Planning (chips and slices, what the compiler reports, closed-form estimates, memory
fit, chip-hours and prices) lives in train/planning/, on top of this package and the
train step.

May import matrixmagic.configs and matrixmagic.model: never train (train/run.py
composes the sharded train step from these parts).
"""
