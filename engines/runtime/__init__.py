"""Runtime inference backends behind one protocol: ``infer(batch) -> named outputs``."""

from engines.runtime.base import Engine, InputSpec, load_engine

__all__ = ["Engine", "InputSpec", "load_engine"]
