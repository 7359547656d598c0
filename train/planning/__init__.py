"""matrixmagic.train.planning: what a run will cost before it runs, on a laptop.

  chips.py      TPU slices and GPUs: topologies, HBM, peak FLOP/s (cited); `--topology`
                names and the compile-only devices for them
  compiled.py   a compiled program's memory, FLOPs and out-of-memory, read
  loops.py      while-loop trip counts from the optimized HLO, so FLOPs count every iteration
  plan.py       closed-form memory / FLOPs / time estimates, and `magic compile`'s report
  fit.py        does a run fit this machine's memory (closed forms, before the first compile)
  oom.py        which arrays an out-of-memory is made of, and the knob that shrinks each
  budget.py     tokens -> steps, chip-hours and price (6ND)
  search.py     `magic plan`: the compile path shared with `magic compile`, the layout search and
                its report (plain data in: the CLI turns flags into configs)

May import configs, model, sharding and the train core (train/*.py, train/data/); only
train/cli imports it.
"""
