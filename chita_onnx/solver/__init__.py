"""Pruning solvers on the empirical-Fisher quadratic model (pure NumPy/SciPy, no onnx imports).

``f(w) = ½‖X(w − w̄)‖² + (λ/2)‖w − w̄‖² + αᵀ(w − w̄)`` subject to a :class:`Budget`.
"""

from ._core import Budget, SolverResult, hard_threshold, objective
from .backsolve import ridge_backsolve
from .block import chita_blocked
from .chita import chita_iht
from .schedule import sparsity_schedule

__all__ = [
    "Budget",
    "SolverResult",
    "chita_blocked",
    "chita_iht",
    "hard_threshold",
    "objective",
    "ridge_backsolve",
    "sparsity_schedule",
]

# --- baselines (magnitude, woodfisher, cbs from baselines.py): exports are added below -------------
from .baselines import cbs as cbs
from .baselines import cbs_cost as cbs_cost
from .baselines import magnitude as magnitude
from .baselines import woodfisher as woodfisher
