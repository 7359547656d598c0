"""Where pipeline parallelism meets the mesh: the schedule a traced train step runs.

The model takes a `Pipeline` (model/stages.py) as a plain attribute; this module fills it
from the config and the mesh in context (sharding/partition.py: with_rules enters it), so
mesh.stage=-1 is read as resolved and the model never names a mesh axis itself.
"""

from __future__ import annotations

from typing import Optional

import jax

from matrixmagic.configs.pipeline import bubble_fraction, schedule_of
from matrixmagic.model.stages import Pipeline

from .rules import mesh_axes_of, rules_for

__all__ = ["bubble_fraction", "pipeline_for"]


def pipeline_for(config) -> Optional[Pipeline]:
    """The pipeline a TrainConfig's step runs under the current mesh; None with one stage (the
    stack then scans its layers exactly as without pipeline support)."""
    mesh = jax.sharding.get_abstract_mesh()
    stages = config.mesh.stage if mesh.empty else dict(mesh.shape).get("stage", 1)
    if stages <= 1:
        return None
    axes = () if mesh.empty else mesh_axes_of("activation_stage", rules_for(config.mesh))
    return Pipeline(schedule_of(config.mesh, stages), axes[0] if len(axes) == 1 else None)
