"""Checkpoints with orbax: one atomic step directory holds the train state, the
data-iterator state and the resolved config (JSON).

Saves are asynchronous (training continues while the arrays are written) and
orbax commits a step directory only once it is complete, so a crash mid-save
leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


def config_to_json(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, config) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config_to_json(config)),
        ))

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict, dict]:
        """(state, data_state, config_json) of `step` (default: latest), restored
        into the shardings of `abstract_state` (ShapeDtypeStructs with .sharding)."""
        step = self.manager.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        ))
        return restored["state"], restored["data"], restored["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_params(workdir: str):
    """(params, TrainConfig) of the latest checkpoint in a run directory, on the default device."""
    from train.loop import config_from_json
    from train.state import create_train_state
    from train.step import make_tx

    ckpt = Checkpointer(workdir, async_save=False)
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"--workdir {workdir!r} has no checkpoint; train one with "
                                f"`magic train --set workdir={workdir}` first.")
    config_json = ckpt.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    config = config_from_json(config_json)
    tx = make_tx(config)
    abstract = jax.eval_shape(lambda: create_train_state(config.model, tx, jax.random.PRNGKey(0)))
    state, _, _ = ckpt.restore(abstract, step)
    ckpt.close()
    return state.params, config
