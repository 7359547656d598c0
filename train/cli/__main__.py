"""`python -m matrixmagic.train.cli ...` runs `magic ...` (what the multi-process tests launch)."""

import sys

from ..interrupts import leave
from .main import main

sys.exit(leave(main()))
