"""xopt's rules as optax gradient transformations: ``xopt.optax.adam(learning_rate=1e-3)``.

Each function takes optax's argument names and defaults and returns an ``optax.GradientTransformation``
(``init(params) -> state``, ``update(grads, state, params=None) -> (updates, state)``): pure, jit-able, its
state a pytree (:class:`RuleState`), ``learning_rate`` a float, a 0-d jax or NumPy array or an optax schedule (a
function of the count of updates already applied).  It composes like any optax transformation::

    tx = optax.chain(optax.clip_by_global_norm(1.0), xopt.optax.adamw(1e-3, weight_decay=0.01))

Under ``optax.inject_hyperparams`` the learning rate may be traced; the other hyperparameters are read on the
host when the transformation is made, so they go in ``static_args``::

    tx = optax.inject_hyperparams(xopt.optax.adam, static_args=("b1", "b2", "eps", "eps_root"))(learning_rate=1e-3)

The math is xopt's: the optimizer's array-API ``rule`` (:class:`xopt.Adam` and the others), called on
jax.numpy arrays, leaf by leaf, inside the traced function.  What is not reused as it is, and why: the
rule's per-step scalars.  xopt computes them on the host in Python floats (``Optimizer.scalars(step)``,
with ``math.sqrt`` and Python comparisons), which cannot take a traced step count or a scheduled learning
rate.  So each transformation here restates, in jax.numpy, the few scalars that depend on the count or the
learning rate (Adam's step size and bias correction; SGD's first-step momentum), and takes the others from
xopt's ``scalars``.  :func:`_transformation` checks, when a transformation is made, that every scalar the
host computes differently for another count or learning rate is one of those restated, so the two cannot
drift apart silently.  The rule's branches on a traced scalar (Adam's ``if s["sqrt_bc2"] != 1.0``) take the
general path, which gives the same numbers.

An update is the rule's new param minus the param.  A rule without weight decay reads the param only to
subtract from it: it is given zeros, so its update is exactly the rule's step (no rounding from the
subtraction), and ``params`` may be None, as in optax.

Where xopt's rule and optax's differ, the rule's numbers (torch.optim's) are kept and optax's option is
refused or documented, never silently followed: ``rmsprop`` adds eps after the root (``eps_in_sqrt=False``;
optax's default is True), ``adagrad`` adds eps after the root (optax: inside it).  Not here: ``nadam`` and
``radam`` (optax's are other algorithms than torch's NAdam and RAdam, which xopt's are), ``adafactor``,
``lamb`` (their rules read norms through host floats).  Options xopt's rules have no counterpart for
(``eps_root``, ``mu_dtype``, ``nesterov`` in adam, ``mask``) accept their neutral value only.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xopt.optimizers.adadelta import AdaDelta as _AdaDelta
from xopt.optimizers.adagrad import AdaGrad as _AdaGrad
from xopt.optimizers.adam import Adam as _Adam
from xopt.optimizers.adam import AdamW as _AdamW
from xopt.optimizers.adamax import Adamax as _Adamax
from xopt.optimizers.lion import Lion as _Lion
from xopt.optimizers.rmsprop import RMSprop as _RMSprop
from xopt.optimizers.sgd import SGD as _SGD

__all__ = ["RuleState", "sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta", "adamax", "lion"]


class RuleState(NamedTuple):
    """The state of an xopt.optax transformation: ``count`` (int32, updates applied) and ``buffers`` (the
    rule's state buffer names, xopt's: ``m``, ``v``, ... -> a pytree shaped as the params)."""

    count: Any
    buffers: dict


class _Traced:
    """A scalar computed from the traced count or learning rate, handed to the rule: arithmetic is the jax
    value's; a comparison (the rule skipping work for a value such as 1.0) answers "not equal", the general
    path, which gives the same numbers for any value."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __ne__(self, other):
        return True

    def __eq__(self, other):
        return False

    __hash__ = None

    def __bool__(self):
        return True

    def __mul__(self, other):
        return self.value * other

    def __rmul__(self, other):
        return other * self.value

    def __truediv__(self, other):
        return self.value / other

    def __rtruediv__(self, other):
        return other / self.value

    def __add__(self, other):
        return self.value + other

    def __radd__(self, other):
        return other + self.value

    def __sub__(self, other):
        return self.value - other

    def __rsub__(self, other):
        return other - self.value

    def __neg__(self):
        return -self.value


def _host(value):
    """A hyperparameter as xopt's optimizer takes it: a concrete 0-d jax or NumPy array (``jnp.asarray(0.9)``, what
    optax.inject_hyperparams passes to ``init``) as its Python number."""
    if isinstance(value, (jax.Array, np.ndarray)) and value.ndim == 0:
        return value.item()
    return value


def _hyperparameters(factory):
    """``factory``'s arguments other than ``learning_rate`` through :func:`_host`, a traced one refused (the
    host reads them).  The signature stays the factory's (inject_hyperparams reads it)."""
    signature = inspect.signature(factory)

    @functools.wraps(factory)
    def wrapped(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        traced = tuple(name for name, value in bound.arguments.items()
                       if name != "learning_rate" and isinstance(value, jax.core.Tracer))
        if traced:
            verb = "is" if len(traced) == 1 else "are"
            raise TypeError(f"xopt.optax.{factory.__name__}: {', '.join(traced)} {verb} traced; only learning_rate "
                            f"may be (under optax.inject_hyperparams, static_args={traced!r})")
        for name, value in bound.arguments.items():
            if name != "learning_rate":
                bound.arguments[name] = _host(value)
        return factory(*bound.args, **bound.kwargs)

    return wrapped


def _transformation(where, make, learning_rate, traced, needs_params, decoupled=0.0):
    """An optax transformation stepping xopt optimizer ``make(lr)``'s rule.  ``traced(count, lr)`` gives
    the scalars that depend on the step count ``count`` (1 on the first update) or on ``lr``.  The learning
    rate may be a number, a 0-d jax array, an optax schedule, or traced (optax.inject_hyperparams's, under
    jit): a traced one is used as a schedule's value is, unchecked (its value cannot be read)."""
    if isinstance(learning_rate, jax.core.Tracer):
        value = learning_rate
        learning_rate, scheduled, probe = (lambda count: value), True, 1e-3  # any valid lr: for the checks
    else:
        learning_rate = _host(learning_rate)
        scheduled = callable(learning_rate)
        # a schedule's argument is a jax int32 count, as optax passes it (a schedule may use its array methods)
        probe = float(learning_rate(jnp.zeros([], jnp.int32))) if scheduled else learning_rate
    try:
        opt = make(probe)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"xopt.optax.{where}: {exc}") from None
    static = opt.scalars(1)
    _check_traced(where, make, probe, set(traced(1, probe)))
    names = opt.buffers()

    def init_fn(params):
        _check_floating(where, params)
        return RuleState(count=jnp.zeros([], jnp.int32),
                         buffers={name: jax.tree.map(lambda p, v=opt.initial_value(name): jnp.full_like(p, v, _dtype(p)),
                                                     params)
                                  for name in names})

    def update_fn(updates, state, params=None):
        if needs_params and params is None:
            raise ValueError(f"xopt.optax.{where}: its weight decay reads the params: pass them to update")
        _check_floating(where, updates)
        if needs_params:
            _check_floating(where, params)
        lr = learning_rate(state.count) if scheduled else learning_rate
        count = optax.safe_int32_increment(state.count)
        s = {**static, **{k: v if isinstance(v, (int, float)) else _Traced(v) for k, v in traced(count, lr).items()}}
        grads, tree = jax.tree.flatten(updates)
        # as jax arrays: a NumPy leaf times a _Traced scalar (AdamW's decay) would be a NumPy array of objects
        # strongly typed: a weak float64 leaf (a Python float) times a float32 schedule's lr would be float32
        grads = [jnp.asarray(g, _dtype(g)) for g in grads]
        ps = [jnp.asarray(p, _dtype(p)) for p in tree.flatten_up_to(params)] if needs_params else [None] * len(grads)
        bufs = {name: [jnp.asarray(b, _dtype(b)) for b in tree.flatten_up_to(state.buffers[name])] for name in names}
        out, new_bufs = [], {name: [] for name in names}
        # decoupled weight decay (W <- (1 - lr wd) W - step): the rule is given zeros, its step comes back
        # unrounded, and -lr wd W is added here (rule(W) - W would round the update to W's ulp: in bfloat16 a
        # step under half an ulp would be an update of 0)
        shrink = jnp.asarray(lr, jnp.result_type(float)) * decoupled if decoupled else None
        for i, (g, p) in enumerate(zip(grads, ps)):
            zero = p is None or shrink is not None
            p_new, new = opt.rule(jnp, jnp.zeros_like(g) if zero else p, g,
                                  {name: bufs[name][i] for name in names}, s)
            out.append(p_new if p is None else p_new - shrink * p if shrink is not None else p_new - p)
            for name in names:
                new_bufs[name].append(new[name].astype(bufs[name][i].dtype))
        return (tree.unflatten([u.astype(g.dtype) for u, g in zip(out, grads)]),
                RuleState(count=count, buffers={name: tree.unflatten(new_bufs[name]) for name in names}))

    return optax.GradientTransformation(init_fn, update_fn)


def _dtype(leaf):
    """The dtype a leaf is stepped in: its own, strongly typed (jnp.result_type of a Python float is the default float)."""
    return jnp.result_type(leaf)


def _check_floating(where, tree):
    """Every leaf a real floating array: the rules square a gradient as ``g * g`` (not ``|g|²``, as optax does
    for a complex one), and an integer param would have its update truncated."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"xopt.optax.{where}: {jax.tree_util.keystr(path)} is {dtype}: params and updates must "
                            "be real floating arrays")


def _check_traced(where, make, lr, traced):
    """Every host scalar that changes with the step count or the learning rate must be among ``traced``."""
    a, b = make(lr).scalars(1), make(lr * 0.5 + 0.25).scalars(7)
    moving = {k for k in a if a[k] != b[k]}
    if not moving <= traced:
        raise AssertionError(f"xopt.optax.{where}: scalars {sorted(moving - traced)} depend on the step or lr and "
                             "are not recomputed under the trace")


def _refuse(where, **given):
    """Options xopt's rule has no counterpart for: each must be at its neutral value."""
    for name, (value, neutral) in given.items():
        if value != neutral:
            raise ValueError(f"xopt.optax.{where}: {name}={value!r} is not supported (only {neutral!r})")


def _bias_correction(beta, count):
    return 1.0 - beta ** jnp.asarray(count).astype(jnp.result_type(float))


# -- the transformations -------------------------------------------------------------------------------


@_hyperparameters
def sgd(learning_rate, momentum=None, nesterov=False, accumulator_dtype=None):
    """optax.sgd: ``W <- W - lr g``; with ``momentum``, a trace ``b <- momentum b + g`` (``g + momentum b``
    with ``nesterov``).  xopt's :class:`xopt.SGD` rule."""
    _refuse("sgd", accumulator_dtype=(accumulator_dtype, None))

    def make(lr):
        # optax's nesterov without a momentum (None, or 0: a trace of g alone) is plain SGD; xopt's SGD refuses it
        return _SGD(lr=lr, momentum=momentum or 0.0, nesterov=bool(nesterov and momentum))

    def traced(count, lr):
        first = jnp.asarray(count) == 1
        return {"lr": lr, "b_decay": jnp.where(first, 0.0, momentum or 0.0)}  # the trace starts at g

    return _transformation("sgd", make, learning_rate, traced, needs_params=False)


def _adam_traced(beta1, beta2, weight_decay, decoupled):
    def traced(count, lr):
        bc1, bc2 = _bias_correction(beta1, count), _bias_correction(beta2, count)
        # lr in the widest float: an optax schedule gives float32 even under x64, and optax multiplies it into
        # float64 updates (a float32 product would round the decay)
        decay = 1.0 - jnp.asarray(lr, jnp.result_type(float)) * weight_decay if decoupled else 1.0
        return {"step_size": lr / bc1, "sqrt_bc2": jnp.sqrt(bc2), "decay": decay}

    return traced


@_hyperparameters
def adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None, *, nesterov=False):
    """optax.adam: xopt's :class:`xopt.Adam` rule with ε added after bias correction (``eps_hat=False``)."""
    _refuse("adam", eps_root=(eps_root, 0.0), mu_dtype=(mu_dtype, None), nesterov=(nesterov, False))

    def make(lr):
        return _Adam(lr=lr, beta1=b1, beta2=b2, eps=eps, eps_hat=False)

    return _transformation("adam", make, learning_rate, _adam_traced(b1, b2, 0.0, False), needs_params=False)


@_hyperparameters
def adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None, weight_decay=1e-4, mask=None, *,
          nesterov=False):
    """optax.adamw: xopt's :class:`xopt.AdamW` rule, ``W <- (1 - lr wd) W`` then Adam's step."""
    _refuse("adamw", eps_root=(eps_root, 0.0), mu_dtype=(mu_dtype, None), mask=(mask, None), nesterov=(nesterov, False))

    def make(lr):
        return _AdamW(lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=weight_decay, eps_hat=False)

    return _transformation("adamw", make, learning_rate, _adam_traced(b1, b2, weight_decay, True),
                           needs_params=weight_decay != 0.0, decoupled=weight_decay)


@_hyperparameters
def rmsprop(learning_rate, decay=0.9, eps=1e-8, initial_scale=0.0, eps_in_sqrt=False, centered=False, momentum=None,
            nesterov=False, bias_correction=False):
    """RMSprop with optax.rmsprop's names and torch.optim.RMSprop's numbers (xopt's :class:`xopt.RMSprop`):
    ``W <- W - lr g / (sqrt(h) + eps)``.  ``eps_in_sqrt`` must be False (optax's default is True: ε inside
    the root).  With ``momentum`` the trace is of ``g / d``, scaled by the lr after (torch's; optax traces the
    lr-scaled update: the same numbers while the lr is constant)."""
    _refuse("rmsprop", eps_in_sqrt=(eps_in_sqrt, False), initial_scale=(initial_scale, 0.0),
            nesterov=(nesterov, False), bias_correction=(bias_correction, False))

    def make(lr):
        return _RMSprop(lr=lr, decay_rate=decay, eps=eps, momentum=momentum or 0.0, centered=centered)

    return _transformation("rmsprop", make, learning_rate, lambda count, lr: {"lr": lr}, needs_params=False)


@_hyperparameters
def adagrad(learning_rate, initial_accumulator_value=0.1, eps=1e-7):
    """AdaGrad with optax.adagrad's names and torch.optim.Adagrad's numbers (xopt's :class:`xopt.AdaGrad`):
    ``h <- h + g²;  W <- W - lr g / (sqrt(h) + eps)`` (optax: ``g / sqrt(h + eps)``; the same for eps=0)."""

    def make(lr):
        return _AdaGrad(lr=lr, eps=eps, initial_accumulator_value=initial_accumulator_value)

    return _transformation("adagrad", make, learning_rate, lambda count, lr: {"clr": lr}, needs_params=False)


@_hyperparameters
def adadelta(learning_rate=None, rho=0.9, eps=1e-6, weight_decay=0.0, weight_decay_mask=None):
    """optax.adadelta: xopt's :class:`xopt.AdaDelta` rule; ``learning_rate=None`` is 1.0 (the paper's)."""
    _refuse("adadelta", weight_decay_mask=(weight_decay_mask, None))
    learning_rate = 1.0 if learning_rate is None else learning_rate

    def make(lr):
        return _AdaDelta(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay)

    return _transformation("adadelta", make, learning_rate, lambda count, lr: {"lr": lr},
                           needs_params=weight_decay != 0.0)


@_hyperparameters
def adamax(learning_rate, b1=0.9, b2=0.999, eps=1e-8):
    """optax.adamax: xopt's :class:`xopt.Adamax` rule, ``u <- max(b2 u, |g| + eps)``."""

    def make(lr):
        return _Adamax(lr=lr, beta1=b1, beta2=b2, eps=eps)

    return _transformation("adamax", make, learning_rate,
                           lambda count, lr: {"clr": lr / _bias_correction(b1, count)}, needs_params=False)


@_hyperparameters
def lion(learning_rate, b1=0.9, b2=0.99, mu_dtype=None, weight_decay=1e-3, mask=None):
    """optax.lion: xopt's :class:`xopt.Lion` rule, ``W <- W - lr (sign(b1 m + (1 - b1) g) + wd W)``."""
    _refuse("lion", mu_dtype=(mu_dtype, None), mask=(mask, None))

    def make(lr):
        return _Lion(lr=lr, beta1=b1, beta2=b2, weight_decay=weight_decay)

    return _transformation("lion", make, learning_rate, lambda count, lr: {"lr": lr},
                           needs_params=weight_decay != 0.0, decoupled=weight_decay)
