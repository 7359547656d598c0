"""Joining the processes of a multi-host run into one set of global devices.

Every host runs the same `magic train` command; `jax.distributed.initialize`
connects them (before any JAX computation) so `jax.devices()` lists every
chip in the job and one jitted step drives them all. JAX finds the coordinator
by itself on TPU pods (the TPU VM metadata), under SLURM (`srun`) and Open MPI;
elsewhere pass `--coordinator HOST:PORT --num-processes N --process-id I`.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

from matrixmagic.configs.model_config import ConfigError

# Environment variables that mean "this process is one of several", per launcher.
_TPU_HOSTS = "TPU_WORKER_HOSTNAMES"  # comma-separated, one per TPU VM host
_MEGASCALE = "MEGASCALE_NUM_SLICES"  # multi-slice TPU
# SLURM: the srun step's task count wins over the allocation's (a batch script
# running one process inside a 2-task allocation is not a 2-process job).
_SLURM_COUNTS = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
_MPI_COUNT = "OMPI_COMM_WORLD_SIZE"


def detect_cluster(env: Mapping[str, str]) -> Optional[str]:
    """'tpu', 'slurm' or 'mpi' when the environment says several processes run; else None."""
    hosts = [h for h in env.get(_TPU_HOSTS, "").split(",") if h.strip()]
    if len(hosts) > 1 or _int(env.get(_MEGASCALE)) > 1:
        return "tpu"
    slurm = next((env[name] for name in _SLURM_COUNTS if name in env), None)
    if _int(slurm) > 1:
        return "slurm"
    if _int(env.get(_MPI_COUNT)) > 1:
        return "mpi"
    return None


def tpu_chips_attached() -> bool:
    """True on a Cloud TPU VM. Pod hosts learn their peers from the VM metadata rather
    than the environment, so on TPU we always let jax.distributed find them (one host
    is then a one-process job). A PCI scan: it does not start the TPU runtime."""
    try:
        from jax._src import hardware_utils  # private, hence the broad guard

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # noqa: BLE001 - any failure means "not a TPU VM we can detect"
        return False


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def check_explicit(coordinator, num_processes, process_id) -> None:
    """All three flags together, with sane values, or none."""
    # A bad value is named on its own first: `--num-processes 0` alone is a wrong count, not a missing coordinator.
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num-processes {num_processes} is invalid: use at least 1 (how many processes run "
                          f"this command).")
    if process_id is not None and process_id < 0:
        raise ConfigError(f"--process-id {process_id} is invalid: use 0..N-1 for --num-processes N (0 for the "
                          f"process at --coordinator).")
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    missing = [k for k, v in given.items() if v is None]
    if len(missing) < 3 and missing:
        raise ConfigError(f"{', '.join(missing)} missing: a manual multi-process launch needs --coordinator HOST:PORT, "
                          f"--num-processes N and --process-id I (0..N-1) on every process.")
    if missing:
        return
    if ":" not in str(coordinator):
        raise ConfigError(f"--coordinator {coordinator!r} is invalid: write HOST:PORT, e.g. 10.0.0.1:1234 "
                          f"(process 0's address and a free port).")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(f"--num-processes {num_processes} --process-id {process_id} is invalid: use N >= 1 and "
                          f"a process id in 0..N-1.")


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, env: Optional[Mapping[str, str]] = None) -> bool:
    """Join the job's processes when more than one runs; True if it did.

    Call before anything touches a JAX backend. Safe to call on a single
    machine (returns False) and twice (the second call is a no-op).
    """
    check_explicit(coordinator, num_processes, process_id)  # before jax loads: a bad flag fails at once
    import jax

    env = os.environ if env is None else env
    explicit = coordinator is not None
    if explicit and num_processes == 1:
        return False
    if not explicit and detect_cluster(env) is None and not tpu_chips_attached():
        return False
    if jax.distributed.is_initialized():
        return True
    # CPU processes need a collectives backend to all-reduce across hosts; GPUs
    # and TPUs ignore this setting, so it is safe to set unconditionally.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    else:
        jax.distributed.initialize()  # coordinator, count and id from the TPU / SLURM / MPI environment
    return True
