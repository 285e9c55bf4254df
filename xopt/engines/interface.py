"""What an engine offers the rest of xopt: the two interfaces, as :class:`typing.Protocol` classes.

An engine is a module.  :mod:`xopt._dispatch` picks one per param and hands it work through these
functions only; ``tests/test_engines.py`` checks that every engine module defines them with these
parameters.

- :class:`Engine` (the checked path, ``_checked.step`` through ``_dispatch.select``): the CPU, CUDA and Dask
  engines, and the CUDA one of 8-bit state (:mod:`xopt.engines.cuda_blockwise`).  The Dask one runs a whole step of its chunks on their workers, whatever the optimizer: it has no
  ``supports``.
- :class:`LaneEngine` (the exact-type lane, :mod:`xopt._lane`): an engine that reads a step's arrays itself,
  in one compiled call, and takes a whole step or declines it having written nothing: the CPU engine
  (``numpy.ndarray``) and the CUDA one (``cupy.ndarray``).
"""

from __future__ import annotations

from typing import Callable, Protocol

__all__ = ["Engine", "LaneEngine"]


class Engine(Protocol):
    def supports(self, opt) -> bool:
        """Whether it has a kernel for ``opt``'s rule and options."""

    def accepts(self, opt, e) -> bool:
        """Whether it takes this checked param (``e``, an ``xopt._inputs.Entry``: its array type, dtype, device)."""

    def apply(self, opt, entries) -> list:
        """The writes of one step of these checked entries, one hyperparameter set (``opt``), each entry with
        its ``state``, ``scalars`` and clip scale (``Entry.clip``; None: none), which it applies to a grad as it
        reads it: calls into C, made by the caller with every other write of the step in one C-level call
        (``xopt._atomic.together``).  Nothing is written before the caller makes them."""


class LaneEngine(Engine, Protocol):
    def kind(self, opt, dtype):
        """What a step of ``opt`` on params of ``dtype`` runs (``.order``: its scalars' order, a function of the
        dict ``opt.scalars(step)``; ``.slots``: its state buffers), or None: no kernel."""

    def new_state(self, view, kind, p) -> dict | None:
        """The state param ``p`` starts from, or None where the lane leaves its first step to the checked path."""

    def step(self, opt, kind, views, values, ps, gs, states, steps, part, commit: Callable) -> bool | None:
        """The whole step, every array checked first, committed with ``commit(norm, skipped)``'s calls in the same
        C-level call as its writes; True: done (or skipped by skip_nonfinite), None: declined, nothing written.
        ``views``/``values``: each part's hyperparameter set and kernel scalars; ``part``: each tensor's part
        (None: all part 0); ``ps``, ``gs``, ``states``, ``steps``: lists the caller holds."""

    def tensor_dtype(self, t):
        """The NumPy dtype of the kernel a lane step on torch tensors like ``t`` runs, or None: it takes no such
        tensors (the CPU engine takes CPU tensors, the CUDA one CUDA tensors)."""

    def tensor_device(self, t):
        """The device of torch tensor ``t`` as this engine names devices (the self-check's GPU id)."""

    def step_tensors(self, opt, kind, views, values, ps, gs, states, steps, part, commit: Callable) -> bool | None:
        """:meth:`step` where ``ps``, ``gs`` and the state buffers are torch tensors (the lane's exact types), read
        through torch's accessors; None: declined, nothing written (an engine that takes no tensors declines)."""
