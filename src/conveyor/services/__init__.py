"""Maintenance services. Each is ``run_once(now=None)``: one pass, with an injectable clock."""

from .pruner import Pruner, PruneResult, Retention
from .rescuer import Rescuer
from .vacuum import Vacuum
from .watchdog import Watchdog

__all__ = ["PruneResult", "Pruner", "Rescuer", "Retention", "Vacuum", "Watchdog"]
