"""The torch.optim features xopt reproduces, as a table, and the two runners that compare them.

Shared by ``tools/make_golden.py`` (which stores torch.optim's trajectories in
``tests/golden/``) and by the tests (which replay them, and compare live when
torch is installed).  Each case: xopt's class and arguments, torch's class and
arguments, the learning rate of each step (a schedule), and how torch's state
buffers are named in xopt.
"""

from __future__ import annotations

import numpy as np

SHAPES = {"W": (3, 4), "b": (5,)}
STEPS = 10  # RAdam's rectification switches on at step 6 (with any beta2): both sides of it
NO_GRAD = (3, "b")  # at this step this param gets no grad: both must leave it alone

_LR_SCHEDULE = [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125, 0.125, 0.125]  # multiplies the case's lr, step by step

ADAM_STATE = {"exp_avg": "m", "exp_avg_sq": "v", "max_exp_avg_sq": "v_max"}
RMSPROP_STATE = {"square_avg": "h", "grad_avg": "g_avg", "momentum_buffer": "b"}
ADADELTA_STATE = {"square_avg": "msg", "acc_delta": "msdx"}
ADAMAX_STATE = {"exp_avg": "m", "exp_inf": "u"}
MV_STATE = {"exp_avg": "m", "exp_avg_sq": "v"}  # NAdam, RAdam

CASES = {
    "sgd": ("SGD", dict(lr=0.1), "SGD", dict(lr=0.1), {}),
    "sgd-wd": ("SGD", dict(lr=0.1, weight_decay=0.05), "SGD", dict(lr=0.1, weight_decay=0.05), {}),
    "sgd-momentum": ("SGD", dict(lr=0.05, momentum=0.9), "SGD", dict(lr=0.05, momentum=0.9),
                     {"momentum_buffer": "b"}),
    "sgd-dampening-wd": ("SGD", dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01),
                         "SGD", dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01),
                         {"momentum_buffer": "b"}),
    "sgd-nesterov": ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.02),
                     "SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.02),
                     {"momentum_buffer": "b"}),
    # The seed's velocity forms equal torch's SGD while lr is constant (the schedule is off for them).
    "momentum": ("Momentum", dict(lr=0.05, momentum=0.9), "SGD", dict(lr=0.05, momentum=0.9), {}),
    "nesterov": ("Nesterov", dict(lr=0.05, momentum=0.9), "SGD", dict(lr=0.05, momentum=0.9, nesterov=True), {}),
    "adagrad": ("AdaGrad", dict(lr=0.1, eps=1e-10), "Adagrad", dict(lr=0.1, eps=1e-10), {"sum": "h"}),
    "adagrad-all": ("AdaGrad", dict(lr=0.1, eps=1e-6, lr_decay=0.05, initial_accumulator_value=0.1,
                                    weight_decay=0.05),
                    "Adagrad", dict(lr=0.1, eps=1e-6, lr_decay=0.05, initial_accumulator_value=0.1,
                                    weight_decay=0.05), {"sum": "h"}),
    "rmsprop": ("RMSprop", dict(lr=0.01, decay_rate=0.9, eps=1e-8), "RMSprop", dict(lr=0.01, alpha=0.9, eps=1e-8),
                RMSPROP_STATE),
    "rmsprop-centered": ("RMSprop", dict(lr=0.01, decay_rate=0.9, eps=1e-8, centered=True),
                         "RMSprop", dict(lr=0.01, alpha=0.9, eps=1e-8, centered=True), RMSPROP_STATE),
    "rmsprop-momentum-wd": ("RMSprop", dict(lr=0.01, decay_rate=0.95, eps=1e-6, momentum=0.8, weight_decay=0.1),
                            "RMSprop", dict(lr=0.01, alpha=0.95, eps=1e-6, momentum=0.8, weight_decay=0.1),
                            RMSPROP_STATE),
    "rmsprop-all": ("RMSprop", dict(lr=0.01, decay_rate=0.9, eps=1e-8, momentum=0.5, centered=True,
                                    weight_decay=0.01),
                    "RMSprop", dict(lr=0.01, alpha=0.9, eps=1e-8, momentum=0.5, centered=True, weight_decay=0.01),
                    RMSPROP_STATE),
    "adam": ("Adam", dict(lr=0.01, eps=1e-8, eps_hat=False), "Adam", dict(lr=0.01, eps=1e-8), ADAM_STATE),
    "adam-betas": ("Adam", dict(lr=0.02, beta1=0.5, beta2=0.9, eps=1e-6, eps_hat=False),
                   "Adam", dict(lr=0.02, betas=(0.5, 0.9), eps=1e-6), ADAM_STATE),
    "adam-amsgrad-wd": ("Adam", dict(lr=0.01, eps=1e-8, amsgrad=True, weight_decay=0.1, eps_hat=False),
                        "Adam", dict(lr=0.01, eps=1e-8, amsgrad=True, weight_decay=0.1), ADAM_STATE),
    "adamw": ("AdamW", dict(lr=0.01), "AdamW", dict(lr=0.01), ADAM_STATE),
    "adamw-amsgrad": ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True, beta2=0.99),
                      "AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True, betas=(0.9, 0.99)), ADAM_STATE),
    "adadelta": ("AdaDelta", dict(lr=1.0), "Adadelta", dict(lr=1.0), ADADELTA_STATE),
    "adadelta-wd": ("AdaDelta", dict(lr=0.5, rho=0.8, eps=1e-4, weight_decay=0.05),
                    "Adadelta", dict(lr=0.5, rho=0.8, eps=1e-4, weight_decay=0.05), ADADELTA_STATE),
    "adamax": ("Adamax", dict(lr=0.002), "Adamax", dict(lr=0.002), ADAMAX_STATE),
    "adamax-wd": ("Adamax", dict(lr=0.01, beta1=0.5, beta2=0.9, eps=1e-6, weight_decay=0.05),
                  "Adamax", dict(lr=0.01, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.05), ADAMAX_STATE),
    "nadam": ("NAdam", dict(lr=0.002), "NAdam", dict(lr=0.002), MV_STATE),
    "nadam-wd": ("NAdam", dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.05, momentum_decay=0.1),
                 "NAdam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, momentum_decay=0.1),
                 MV_STATE),
    "nadam-decoupled": ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
                        "NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True), MV_STATE),
    "radam": ("RAdam", dict(lr=0.01), "RAdam", dict(lr=0.01), MV_STATE),
    "radam-wd": ("RAdam", dict(lr=0.01, beta1=0.5, beta2=0.9, eps=1e-6, weight_decay=0.05),
                 "RAdam", dict(lr=0.01, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.05), MV_STATE),
    "radam-decoupled": ("RAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
                        "RAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True), MV_STATE),
}


def lr_schedule(case):
    """The learning rate of each step: the case's lr times _LR_SCHEDULE (constant for the seed's forms)."""
    xopt_name, xopt_kwargs = CASES[case][0], CASES[case][1]
    factors = [1.0] * STEPS if xopt_name in ("Momentum", "Nesterov") else _LR_SCHEDULE
    return [xopt_kwargs["lr"] * f for f in factors]


def inputs(seed):
    """Initial params and the grads of every step: fresh normal draws, float64, never zeros."""
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(STEPS)]
    return params, grads


def run_torch(case, params, grads):
    """torch.optim's trajectory: params after each step, and the final state under xopt's names."""
    import torch

    _, _, torch_name, torch_kwargs, state_names = CASES[case]
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in params.items()}
    opt = getattr(torch.optim, torch_name)(list(tensors.values()), **torch_kwargs)
    trajectory = []
    default_dtype = torch.get_default_dtype()
    # torch keeps its per-param scalars (step, NAdam's mu_product) in the default dtype: float64 here, as
    # xopt's host scalars are (in float32 NAdam's mu_product alone would put 1e-8 between the two).
    torch.set_default_dtype(torch.float64)
    try:
        for step, (lr, g) in enumerate(zip(lr_schedule(case), grads), start=1):
            for group in opt.param_groups:
                group["lr"] = lr
            for k, t in tensors.items():
                t.grad = None if (step, k) == NO_GRAD else torch.tensor(g[k], dtype=torch.float64)
            opt.step()
            trajectory.append({k: t.detach().numpy().copy() for k, t in tensors.items()})
    finally:
        torch.set_default_dtype(default_dtype)
    state = {}
    for k, t in tensors.items():
        st = opt.state[t]
        state[k] = {ours: st[theirs].detach().numpy().copy() for theirs, ours in state_names.items()
                    if theirs in st}
    return trajectory, state


def run_xopt(case, params, grads, to_array, to_numpy, **options):
    """xopt's trajectory on arrays made by ``to_array``, read back by ``to_numpy``."""
    import xopt

    xopt_name, xopt_kwargs = CASES[case][0], CASES[case][1]
    opt = getattr(xopt, xopt_name)(**xopt_kwargs, **options)
    arrays = {k: to_array(v) for k, v in params.items()}
    trajectory = []
    for step, (lr, g) in enumerate(zip(lr_schedule(case), grads), start=1):
        opt.lr = lr
        opt.update(arrays, {k: None if (step, k) == NO_GRAD else to_array(v) for k, v in g.items()})
        trajectory.append({k: to_numpy(a) for k, a in arrays.items()})
    state = {k: {name: to_numpy(buf) for name, buf in st.items() if name != "step"} for k, st in opt.state.items()}
    return trajectory, state
