"""A step is all or nothing: one thread at a time, and Ctrl-C between steps, never inside one.

``update()`` runs under a :class:`StepGuard`: the optimizer's lock (a second thread waits
for the first's step to end; a call from inside a step of the same optimizer raises), and
SIGINT held back while the main thread is inside a step, then handed to the handler it was
meant for (a KeyboardInterrupt, by default) once the step's arrays and step counts have all
moved.  Without it a Ctrl-C landing between the kernel and the step counts would leave a
step applied but not counted, and a resume would repeat its bias correction.

Holding back costs a check of one number per step: at the first step taken on the main
thread, if SIGINT has Python's default handler, it is replaced once by :func:`_sigint`,
which passes every signal on to that handler unless a step is running.  (Swapping handlers
around every step would cost two system calls, ~5 us, per step.)  A program that installs
its own SIGINT handler afterwards gets it called at once, as without xopt.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["StepGuard"]

_MAIN = threading.main_thread().ident
_held = {"depth": 0, "frames": [], "next": None, "installed": False}


def _sigint(signum, frame):
    """xopt's SIGINT handler: held back during a step on the main thread, else the one it replaced."""
    if _held["depth"]:
        _held["frames"].append(frame)
        return
    _held["next"](signum, frame)


def _install():
    _held["installed"] = True  # one try, whatever it finds
    try:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            _held["next"] = signal.default_int_handler
            signal.signal(signal.SIGINT, _sigint)
    except (ValueError, OSError):  # no signals here (an embedded interpreter)
        pass


class StepGuard:
    """``guard.run(f, *args)`` runs ``f`` as one step; one guard per optimizer."""

    __slots__ = ("lock", "owner")

    def __init__(self):
        self.lock = threading.Lock()
        self.owner = None

    def run(self, f, *args):
        me = threading.get_ident()
        if self.owner == me:
            raise RuntimeError("update() called from inside an update() of the same optimizer")
        main = me == _MAIN
        if main and not _held["installed"]:
            _install()
        # ``with``, not acquire() then try: a KeyboardInterrupt raised at acquire()'s own check for signals,
        # the lock just taken, would leave it held (the next update waits forever); ``with`` releases it.
        with self.lock:
            self.owner = me
            if main:
                _held["depth"] += 1
            try:
                return f(*args)
            finally:
                self.owner = None
                if main:
                    _held["depth"] -= 1
                    if not _held["depth"] and _held["frames"]:
                        frame = _held["frames"][0]
                        _held["frames"].clear()
                        if signal.getsignal(signal.SIGINT) is _sigint:
                            _held["next"](signal.SIGINT, frame)
