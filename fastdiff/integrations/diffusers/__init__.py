"""Everything that knows diffusers: scheduler configs as plans (`schedulers`), fused blocks for
its models (`models`, used by `fastdiff.optimize`) and its pipelines' denoising (`pipelines`).

Nothing is imported here: diffusers is an optional dependency, loaded only by the module that
needs it.
"""
