"""How a step is computed: ``reference`` (the array-API rule, any library), ``fused_cpu`` (numba, NumPy),
``fused_cuda`` (CuPy), ``fused_dask`` (each chunk on its worker); ``kernels`` is what the fused ones share.
Which one runs is decided in one place, :mod:`xopt._dispatch`.  What an engine offers is written down in
:mod:`xopt.engines.interface` (and ``tests/test_engines.py`` holds every engine to it).
"""
