"""Plain-PyTorch reference samplers: the independent oracle for every fused path."""
from fastdiff.reference.solvers import PREDICTIONS, SOLVERS, ReferenceSolver, to_eps, to_x0

__all__ = ["PREDICTIONS", "SOLVERS", "ReferenceSolver", "to_eps", "to_x0"]
