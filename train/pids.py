"""Whether a process of this host is still running: how a run tells its own leftovers (a staged
hf import, a lease, a prepare's half-written record) from a live writer's."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
