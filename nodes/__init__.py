"""Bundled declarative nodes, installed as ``ddnlib.nodes``."""

from .projections import L1Ball, L1Sphere, L2Ball, L2Sphere, LInfBall, LInfSphere, project
from .penalties import PENALTIES, Penalty
from .pooling import RobustGlobalPool1d, RobustGlobalPool2d, RobustPooling, robust_global_pool

__all__: list[str] = [
    "L1Sphere", "L1Ball", "L2Sphere", "L2Ball", "LInfSphere", "LInfBall", "project",
    "RobustGlobalPool1d", "RobustGlobalPool2d", "RobustPooling", "robust_global_pool",
    "Penalty", "PENALTIES",
]
