"""The flags that choose a run's config, shared by `magic train` and `magic compile`.

Both commands take the same flags and turn them into the same typed values, which
`train.run.resolve_config` takes as its flag layer: so
`magic compile <flags> --serialize X` and `magic train <flags> --compiled X` agree.
"""

from __future__ import annotations

import argparse
from typing import Any

from matrixmagic.configs.model_config import REMAT_POLICIES, ConfigError
from matrixmagic.configs.overrides import parse_assignments
from matrixmagic.configs.train_config import LAYOUTS, TrainConfig, mesh_assignments


def add_config_arguments(p) -> None:
    p.add_argument("--preset", help="preset name (see `magic params`; default gpt-tiny, or with --init-from the "
                                    "preset of that run)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override a config field by dotted name, e.g. --set optimizer.learning_rate=3e-4 "
                        "(`magic train --help-fields` lists them); a field set twice keeps the last value, and "
                        "one that a flag (--batch, --mesh, ...) also sets must agree with it")
    p.add_argument("--mesh", help="device mesh sizes, e.g. data=2,fsdp=2,tensor=2 or fsdp=-1,tensor=8: axes not "
                                  "named are 1, -1 fills (default: data=-1)")
    p.add_argument("--layout", choices=LAYOUTS, help="parameter layout (default: implied by the mesh)")
    p.add_argument("--batch", type=int, help="global batch in sequences (default: the preset's batch_tokens / "
                                             "seq_len, rounded down to a multiple of data x fsdp x microbatches)")
    p.add_argument("--remat", choices=REMAT_POLICIES, help="rematerialization policy (model.remat_policy)")
    p.add_argument("--microbatches", type=int, help="gradient-accumulation steps inside the step")


# The flags that are shorthand for one config field: {argparse dest: (the flag, its field)}.
# --mesh is shorthand too, one field per axis it names (`_mesh_shortcuts`).
SHORTCUTS = {"layout": ("--layout", "mesh.layout"), "batch": ("--batch", "batch_size"),
             "remat": ("--remat", "model.remat_policy"), "microbatches": ("--microbatches", "microbatches"),
             "workdir": ("--workdir", "workdir"), "init_from": ("--init-from", "init_from")}


def config_assignments(args, **flags) -> dict[str, Any]:
    """The config flags as typed values, {dotted field: value}, for `train.run.resolve_config`
    (`flags` replace args' values, for sweeps). argparse has typed --batch, --layout, --remat
    and --microbatches; --mesh and --set are strings, parsed here once (a bad one fails before
    jax starts). A flag and a --set of the same field must agree (`refuse_conflicts`)."""
    def flag(name):
        return flags[name] if name in flags else getattr(args, name, None)

    refuse_conflicts(args)
    typed: dict[str, Any] = {}
    for name, (_, field) in SHORTCUTS.items():
        if flag(name) is not None and flag(name) != "":
            typed[field] = flag(name)
    mesh = mesh_assignments(flag("mesh")) if flag("mesh") else []  # unknown axis -> an error naming the allowed ones
    # One parse for --mesh and --set together (none of --mesh's fields is in `typed`).
    # A search's candidate `sets` sit under the user's own --set (theirs win)
    return {**typed, **parse_assignments(TrainConfig, [*mesh, *flags.get("sets", ()), *(args.set or [])])}


def refuse_conflicts(args) -> None:
    """`--batch 8 --set batch_size=16` names one field twice with two values: which one the user
    meant is a guess, so neither wins silently. The same value both ways is fine."""
    sets = list(getattr(args, "set", None) or [])
    if not sets:
        return
    given = parse_assignments(TrainConfig, sets)  # a bad --set fails here, as it would below
    written = {item.partition("=")[0].strip(): item.strip() for item in sets}  # the last --set of each field
    shortcuts = {field: (f"{flag} {getattr(args, name)}", getattr(args, name))
                 for name, (flag, field) in SHORTCUTS.items() if getattr(args, name, None) not in (None, "")}
    shortcuts.update(_mesh_shortcuts(getattr(args, "mesh", None)))
    for field, (said, value) in shortcuts.items():
        if field in given and given[field] != value:
            raise ConfigError(f"{said} and --set {written[field]} both set {field}: keep one.")


def _mesh_shortcuts(text: str | None) -> dict[str, tuple[str, Any]]:
    """{'mesh.fsdp': ('--mesh fsdp=2', 2)} for the axes --mesh names (not the ones it leaves at 1)."""
    if not text:
        return {}
    axes = {f"mesh.{part.partition('=')[0].strip()}" for part in text.split(",")}
    values = parse_assignments(TrainConfig, [a for a in mesh_assignments(text) if a.partition("=")[0] in axes])
    return {field: (f"--mesh {field.removeprefix('mesh.')}={value}", value) for field, value in values.items()}


def add_memory_check_argument(p) -> None:
    """train, generate and explain check the analytic memory against the machine first
    (train/planning/fit.py); this is the one way to skip it. The flag's name is fit.OVERRIDE_FLAG."""
    p.add_argument("--no-memory-check", action="store_true",
                   help="skip the check that the model, batch and activations fit in this machine's memory "
                        "(a closed-form estimate, made before compiling)")


def add_bos_argument(p) -> None:
    """generate, explain and eval put the same ids before a prompt (data/tokenizers.prompt_start)."""
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="put a beginning-of-text token before the prompt (--bos) or nothing (--no-bos); default: "
                        "for a run trained here end-of-text, which starts every training document; for an "
                        "imported Hugging Face checkpoint, what transformers puts there: none for GPT-2")
