"""How a step is computed: ``reference`` (the array-API rule, any library), ``fused_cpu`` (numba, NumPy),
``fused_cuda`` (CuPy), ``fused_dask`` (each chunk on its worker); ``kernels`` is what the fused ones share.
Which one runs is decided in one place, :mod:`xopt._dispatch`.

What every fused engine module offers the checked path (``Optimizer._update``, through ``_dispatch.select``):

- ``supports(opt) -> bool``: it has a kernel for ``opt``'s rule and options;
- ``accepts(opt, entry) -> bool``: it takes this checked param (its array type, dtype, device);
- ``apply(opt, entries)``: the step of these checked entries, one hyperparameter set (``opt``), each with its
  ``state``, ``scalars`` and clip scale (``Entry.clip``, None: none), which it applies to a grad as it reads it.

What an engine whose lane takes some array type offers :mod:`xopt._lane` besides (``_dispatch.lane_engine``
names it; today the CPU one, for ``numpy.ndarray``):

- ``kind(opt, dtype)``: what a step of ``opt`` on params of ``dtype`` runs (its scalars' order ``.order``), or
  None: no kernel;
- ``new_state(view, kind, p) -> dict | None``: the state a param starts from, or None where the lane leaves
  its first step to the checked path;
- ``step(opt, kind, views, values, ps, gs, states, steps, part) -> (norm, skipped) | None``: the whole step,
  every array checked first; None: declined, nothing written.
"""
