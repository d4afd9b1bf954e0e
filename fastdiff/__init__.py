"""fastdiff: fused, CUDA-graphed few-step diffusion sampling."""
from fastdiff.schedules import FlowSchedule, VPSchedule, get_schedule

__version__ = "0.1.0"
from fastdiff._info import info
from fastdiff.grid import SPACINGS, make_grid
from fastdiff.reference.solvers import PREDICTIONS, SOLVERS
from fastdiff.sampler import Sampler, sample
