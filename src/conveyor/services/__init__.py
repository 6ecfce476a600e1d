"""Maintenance services. Each is ``run_once(now=None)``: one pass, with an injectable clock."""

from .rescuer import Rescuer

__all__ = ["Rescuer"]
