"""torch.optim's optimizers, stepped by xopt: ``xopt.torch.Adam(model.parameters(), lr=1e-3)``.

Each class here is a :class:`torch.optim.Optimizer` with its torch.optim counterpart's arguments, defaults,
``param_groups``, ``step(closure=None)``, ``zero_grad`` and ``add_param_group``, whose ``step`` hands every
param that has a grad to one xopt optimizer in one ``update`` call (CPU tensors: the fused CPU kernel, in place,
through the data addresses it reads and checks; other devices: xopt's path for them).  So an ``lr_scheduler``, a training
loop or a checkpoint written for torch.optim works unchanged:

- param groups are xopt ``overrides``: param ``j`` of group ``i`` is ``"i.j"`` to xopt, and group ``i > 0``
  the pattern ``"i.*"``;
- the hyperparameters are read from ``param_groups`` at every ``step()`` (a scheduler's writes count);
- params whose ``grad`` is None are skipped, as torch skips them;
- ``state_dict()`` is torch's: state keyed by param index, torch's buffer names (``exp_avg``, ``exp_avg_sq``,
  ``step``...), so a torch.optim state_dict loads here and this one into torch.optim;
- ``opt.state[p]`` reads a param's state under torch's names (a snapshot: write through ``load_state_dict``);
  ``opt.state = defaultdict(dict)`` (any empty dict) drops every param's state, as in torch.optim; a param's
  state follows the param when ``param_groups`` change (a param popped, moved to another group);
- under ``torch.compile`` the step runs as it is, not traced (a graph break: ``fullgraph=True`` refuses it).

Not supported (refused in the constructor, and at ``step`` if a group is changed to them): ``maximize``,
``capturable``, ``differentiable``; complex and sparse grads (refused by xopt's step, naming the param).
``foreach`` and ``fused`` are kept in the groups, for state_dicts, and otherwise ignored: xopt picks its path.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from xopt._torch_front import _REFUSED, _Front, _betas, _float
from xopt._torch_state import _scalar_dtype
from xopt.optimizers.adadelta import AdaDelta as _AdaDelta
from xopt.optimizers.adafactor import Adafactor as _Adafactor
from xopt.optimizers.adagrad import AdaGrad as _AdaGrad
from xopt.optimizers.adam import Adam as _Adam
from xopt.optimizers.adam import AdamW as _AdamW
from xopt.optimizers.adamax import Adamax as _Adamax
from xopt.optimizers.lion import Lion as _Lion
from xopt.optimizers.muon import Muon as _Muon
from xopt.optimizers.nadam import NAdam as _NAdam
from xopt.optimizers.radam import RAdam as _RAdam
from xopt.optimizers.rmsprop import RMSprop as _RMSprop
from xopt.optimizers.sgd import SGD as _SGD

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam", "Lion",
           "Adafactor", "Muon"]


# -- the optimizers -----------------------------------------------------------------------------------

_ADAM_NAMES = {"exp_avg": "m", "exp_avg_sq": "v", "max_exp_avg_sq": "v_max"}


class SGD(_Front):
    """torch.optim.SGD's arguments and numbers (see :class:`xopt.SGD`); state ``momentum_buffer``."""

    rule = _SGD
    reads = ("lr", "momentum", "dampening", "weight_decay", "nesterov", *_REFUSED)
    names = {"momentum_buffer": "b"}
    counts_steps = False

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *, maximize=False,
                 foreach=None, differentiable=False, fused=None):
        if nesterov and (momentum <= 0 or dampening != 0):  # torch.optim.SGD's check, of its arguments alone
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize, foreach=foreach,
                                      differentiable=differentiable, fused=fused))

    @staticmethod
    def hyper(group):
        # a group without momentum steps as plain SGD whatever its nesterov (torch checks the arguments alone)
        nesterov = group["nesterov"] if group["momentum"] != 0 else False
        return dict(lr=_float(group["lr"]), momentum=group["momentum"], dampening=group["dampening"],
                    weight_decay=_float(group["weight_decay"]), nesterov=nesterov)


class Adam(_Front):
    """torch.optim.Adam's arguments and numbers (see :class:`xopt.Adam`, ``eps_hat=False``); state ``step``,
    ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad).  ``decoupled_weight_decay=True`` is AdamW."""

    rule = _Adam
    # decoupled_weight_decay read at every step, though fixed: a group that changes it is refused, not ignored
    reads = ("lr", "betas", "eps", "weight_decay", "amsgrad", "decoupled_weight_decay", *_REFUSED)
    names = _ADAM_NAMES
    fixed = {"eps_hat": False}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *, foreach=None,
                 maximize=False, capturable=False, differentiable=False, fused=None, decoupled_weight_decay=False):
        if decoupled_weight_decay:
            self.rule = _AdamW
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                      foreach=foreach, maximize=maximize, capturable=capturable,
                                      differentiable=differentiable, fused=fused,
                                      decoupled_weight_decay=decoupled_weight_decay))

    def hyper(self, group):
        if bool(group.get("decoupled_weight_decay", self.rule is _AdamW)) != (self.rule is _AdamW):
            raise ValueError("decoupled_weight_decay is set once for all groups, in the constructor")
        return dict(lr=_float(group["lr"]), **_betas(group), eps=group["eps"],
                    weight_decay=_float(group["weight_decay"]), amsgrad=group["amsgrad"])


class AdamW(Adam):
    """torch.optim.AdamW's arguments and numbers (see :class:`xopt.AdamW`); state as :class:`Adam`'s."""

    rule = _AdamW

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None):
        # decoupled_weight_decay=True in the groups, as torch.optim.AdamW's (a subclass of its Adam): its
        # state_dict loads into torch.optim.Adam as AdamW, as torch.optim.AdamW's does
        _Front.__init__(self, params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                           maximize=maximize, foreach=foreach, capturable=capturable,
                                           differentiable=differentiable, fused=fused, decoupled_weight_decay=True))

    on_load = {"decoupled_weight_decay": True}  # as torch.optim.AdamW's load: a saved Adam group becomes AdamW


class RMSprop(_Front):
    """torch.optim.RMSprop's arguments and numbers (see :class:`xopt.RMSprop`; ``alpha`` is its
    ``decay_rate``); state ``step``, ``square_avg``, ``grad_avg`` (centered), ``momentum_buffer`` (momentum)."""

    rule = _RMSprop
    reads = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", *_REFUSED)
    names = {"square_avg": "h", "grad_avg": "g_avg", "momentum_buffer": "b"}

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      centered=centered, capturable=capturable, foreach=foreach, maximize=maximize,
                                      differentiable=differentiable))

    @staticmethod
    def hyper(group):
        return dict(lr=_float(group["lr"]), decay_rate=group["alpha"], eps=group["eps"],
                    weight_decay=group["weight_decay"], momentum=group["momentum"], centered=group["centered"])


class Adagrad(_Front):
    """torch.optim.Adagrad's arguments and numbers (see :class:`xopt.AdaGrad`); state ``step``, ``sum``.  As in
    torch, every param's state exists from the start (``sum`` = ``initial_accumulator_value``, step 0)."""

    rule = _AdaGrad
    reads = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps", *_REFUSED)
    names = {"sum": "h"}

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10,
                 foreach=None, *, maximize=False, differentiable=False, fused=None):
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value, eps=eps, foreach=foreach,
                                      maximize=maximize, differentiable=differentiable, fused=fused))

    @staticmethod
    def hyper(group):
        return dict(lr=_float(group["lr"]), lr_decay=group["lr_decay"], weight_decay=group["weight_decay"],
                    initial_accumulator_value=group["initial_accumulator_value"], eps=group["eps"])

    def _unstepped_state(self, p, group):
        return {"step": torch.tensor(0.0, dtype=_scalar_dtype()),
                "sum": torch.full_like(p, group["initial_accumulator_value"], memory_format=torch.preserve_format)}


class Adadelta(_Front):
    """torch.optim.Adadelta's arguments and numbers (see :class:`xopt.AdaDelta`); state ``step``,
    ``square_avg``, ``acc_delta``."""

    rule = _AdaDelta
    reads = ("lr", "rho", "eps", "weight_decay", *_REFUSED)
    names = {"square_avg": "msg", "acc_delta": "msdx"}

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0, foreach=None, *, capturable=False,
                 maximize=False, differentiable=False):
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, foreach=foreach,
                                      capturable=capturable, maximize=maximize, differentiable=differentiable))

    @staticmethod
    def hyper(group):
        return dict(lr=_float(group["lr"]), rho=group["rho"], eps=group["eps"], weight_decay=group["weight_decay"])


class Adamax(_Front):
    """torch.optim.Adamax's arguments and numbers (see :class:`xopt.Adamax`); state ``step``, ``exp_avg``,
    ``exp_inf``."""

    rule = _Adamax
    reads = ("lr", "betas", "eps", "weight_decay", *_REFUSED)
    names = {"exp_avg": "m", "exp_inf": "u"}

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, foreach=None, *,
                 maximize=False, differentiable=False, capturable=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach,
                                      maximize=maximize, differentiable=differentiable, capturable=capturable))

    @staticmethod
    def hyper(group):
        return dict(lr=_float(group["lr"]), **_betas(group), eps=group["eps"], weight_decay=group["weight_decay"])


class NAdam(_Front):
    """torch.optim.NAdam's arguments and numbers (see :class:`xopt.NAdam`); state ``step``, ``mu_product``
    (the running product xopt keeps per group: a load reads each group's last, see :meth:`load_state_dict`),
    ``exp_avg``, ``exp_avg_sq``."""

    rule = _NAdam
    reads = ("lr", "betas", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay", *_REFUSED)
    names = {"exp_avg": "m", "exp_avg_sq": "v"}
    derived = ("mu_product",)

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, momentum_decay=4e-3,
                 decoupled_weight_decay=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      momentum_decay=momentum_decay, decoupled_weight_decay=decoupled_weight_decay,
                                      foreach=foreach, maximize=maximize, capturable=capturable,
                                      differentiable=differentiable))

    @staticmethod
    def hyper(group):
        return dict(lr=_float(group["lr"]), **_betas(group), eps=group["eps"], weight_decay=group["weight_decay"],
                    momentum_decay=group["momentum_decay"], decoupled_weight_decay=group["decoupled_weight_decay"])

    def load_state_dict(self, state_dict):
        """torch's ``load_state_dict`` (see :meth:`_Front.load_state_dict`).  The running products of μ start
        again from the state's: each group's from the ``mu_product`` of its param with the most steps, where that
        is not the product run from step 1 with the group's values of now (to its dtype's rounding: a beta1 or
        momentum_decay changed before the checkpoint), else from step 1; none is kept from before the load."""
        super().load_state_dict(state_dict)
        products = self._xopt.__dict__.get("_mu_products")
        if not isinstance(products, dict):
            return
        products.clear()
        for i, (group, saved) in enumerate(zip(self.param_groups, state_dict["param_groups"])):
            found = [st for st in map(state_dict["state"].get, saved["params"])
                     if isinstance(st, Mapping) and "step" in st and isinstance(st.get("mu_product"), torch.Tensor)]
            if not found:
                continue
            last = max(found, key=lambda st: float(st["step"]))
            step, product = int(float(last["step"])), last["mu_product"]
            if step < 1 or product.numel() != 1 or not product.is_floating_point():
                continue
            view = self._xopt._view({**self._xopt._hyper, **self._check_group(i, group)})
            view.__dict__["_history"] = f"{i}.*" if i else None
            ours = view.mu_product(step)  # run from step 1, kept
            if float(product) != float(torch.tensor(ours, dtype=product.dtype)):
                products[f"{i}.*" if i else None] = {0: 1.0, step: float(product)}

    def _torch_state(self, st, p, group):
        out = super()._torch_state(st, p, group)
        i = next(n for n, g in enumerate(self.param_groups) if g is group)
        xo = self._xopt
        if i == 0 or i in (self._present or ()):
            view = xo._at(xo._group_of(f"{i}.0"), st["step"])  # the hyperparameter set whose running products it read
        else:  # a group without grads at the last step: its values, and the products its pattern keeps
            view = xo._view({**xo._hyper, **self._check_group(i, group)})
            view.__dict__["_history"] = f"{i}.*"
        return {"step": out.pop("step"),
                "mu_product": torch.tensor(view.mu_product(st["step"], taken=True), dtype=_scalar_dtype()), **out}


class RAdam(_Front):
    """torch.optim.RAdam's arguments and numbers (see :class:`xopt.RAdam`); state ``step``, ``exp_avg``,
    ``exp_avg_sq``."""

    rule = _RAdam
    reads = ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", *_REFUSED)
    names = {"exp_avg": "m", "exp_avg_sq": "v"}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, decoupled_weight_decay=False,
                 *, foreach=None, maximize=False, capturable=False, differentiable=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled_weight_decay, foreach=foreach,
                                      maximize=maximize, capturable=capturable, differentiable=differentiable))

    @staticmethod
    def hyper(group):
        return dict(lr=_float(group["lr"]), **_betas(group), eps=group["eps"], weight_decay=group["weight_decay"],
                    decoupled_weight_decay=group["decoupled_weight_decay"])


class Lion(_Front):
    """Lion (see :class:`xopt.Lion`; torch.optim has none) with the arguments of the lion-pytorch package:
    ``Lion(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)``; state ``exp_avg``."""

    rule = _Lion
    reads = ("lr", "betas", "weight_decay", *_REFUSED)
    names = {"exp_avg": "m"}
    counts_steps = False

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @staticmethod
    def hyper(group):
        return dict(lr=_float(group["lr"]), **_betas(group), weight_decay=group["weight_decay"])


class Adafactor(_Front):
    """torch.optim.Adafactor's arguments and numbers (see :class:`xopt.Adafactor`; ``eps=(eps1, eps2)``);
    state ``step``, ``row_var`` and ``col_var`` (params of 2 or more dims), ``variance`` (the others)."""

    rule = _Adafactor
    reads = ("lr", "beta2_decay", "eps", "d", "weight_decay", *_REFUSED)
    names = {"row_var": "v_row", "col_var": "v_col", "variance": "v"}

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, *,
                 foreach=None, maximize=False):
        super().__init__(params, dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay,
                                      foreach=foreach, maximize=maximize))

    @staticmethod
    def hyper(group):
        eps1, eps2 = group["eps"]
        return dict(lr=_float(group["lr"]), beta2_decay=group["beta2_decay"], eps1=eps1, eps2=eps2, d=group["d"],
                    weight_decay=group["weight_decay"])

    def _buffer_shape(self, name, p):
        return self._xopt.buffer_shapes(p.shape).get(name)

    def _buffers_for(self, hyper, p):
        return tuple(self._xopt.buffer_shapes(p.shape))


class Muon(_Front):
    """torch.optim.Muon's arguments (see :class:`xopt.Muon`: the Newton-Schulz iteration in the param's dtype,
    where torch's runs in bfloat16); state ``momentum_buffer``.  torch.optim.Muon refuses params that are not
    matrices; here they take AdamW (``adamw_betas``, ``adamw_eps``) and keep ``exp_avg``, ``exp_avg_sq``."""

    rule = _Muon
    reads = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps", "ns_steps", "adjust_lr_fn",
             "adamw_betas", "adamw_eps", *_REFUSED)
    names = {"momentum_buffer": "m", "exp_avg_sq": "v"}
    counts_steps = False

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None, *,
                 adamw_betas=(0.9, 0.999), adamw_eps=1e-8):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                                      adjust_lr_fn=adjust_lr_fn, adamw_betas=adamw_betas, adamw_eps=adamw_eps))

    @staticmethod
    def hyper(group):
        beta1, beta2 = group["adamw_betas"]
        return dict(lr=_float(group["lr"]), weight_decay=group["weight_decay"], momentum=group["momentum"],
                    nesterov=group["nesterov"], ns_coefficients=tuple(group["ns_coefficients"]), eps=group["eps"],
                    ns_steps=group["ns_steps"], adjust_lr_fn=group["adjust_lr_fn"], adamw_beta1=beta1,
                    adamw_beta2=beta2, adamw_eps=group["adamw_eps"])

    def _torch_state(self, st, p, group):
        out = super()._torch_state(st, p, group)
        if "v" in st:  # an AdamW param: its step count and m under AdamW's names
            step = torch.tensor(float(st["step"]), dtype=_scalar_dtype())
            out = {"step": step, "exp_avg": out.pop("momentum_buffer"), **out}
        return out

    def _names_for(self, key):
        """A param AdamW steps keeps m as ``exp_avg`` (see :meth:`_torch_state`)."""
        st = self._xopt.state.get(key) if key is not None else None
        return {"exp_avg": "m", "exp_avg_sq": "v"} if isinstance(st, dict) and "v" in st else self.names

    def _xopt_state(self, key, st, p, hyper):
        if isinstance(st, Mapping) and "exp_avg" in st:
            if "momentum_buffer" in st:
                raise ValueError(f"{type(self).__name__}.load_state_dict: param {key} has state 'exp_avg' and "
                                 "'momentum_buffer', two names of one buffer")
            st = {("momentum_buffer" if k == "exp_avg" else k): v for k, v in st.items()}
        return super()._xopt_state(key, st, p, hyper)

    def _buffer_shape(self, name, p):
        return self._xopt.buffer_shapes(p.shape).get(name)  # a matrix keeps m only, any other param m and v

    def _buffers_for(self, hyper, p):
        return tuple(self._xopt._view({**self._xopt._hyper, **hyper}).buffer_shapes(p.shape))
