"""Steering: the intervention engine and the methods built on it.

>>> from haltrace.steering import Add, steer
"""

from haltrace.steering.engine import (
    Add,
    Intervention,
    NormPreservingAdd,
    Project,
    ScaleHeads,
    SteeringHandle,
    attach,
    steer,
)

__all__ = ["Add", "Intervention", "NormPreservingAdd", "Project", "ScaleHeads", "SteeringHandle", "attach", "steer"]
