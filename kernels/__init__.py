"""Triton kernels, shipped as the subpackage `fastdiff.kernels` (setup.py maps kernels/ here).

One module per op, named after it (`fastdiff.kernels.solver_step`). Nothing is imported here:
Triton is optional, and a module is only imported when its backend is used.
"""
