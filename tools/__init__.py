"""Development tools, not installed with the package: run from a checkout's root.

* ``python -m tools.roofline``: the cost model of the GPU kernels (no GPU needed);
* ``python -m tools.aot_report``: every kernel configuration compiled ahead of time for sm_90, with
  registers, spills and shared memory (no GPU needed).
"""
