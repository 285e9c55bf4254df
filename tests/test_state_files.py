"""State files in hard times: failed, interrupted and killed saves, stale temp files, what a save and a load
cost in memory, saves while another thread steps, and the checks' cache staying small."""

import errno
import gc
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import weakref

import numpy as np
import pytest

import xopt
from xopt import state_check, state_files, state_write

ROOT = pathlib.Path(__file__).resolve().parents[1]
posix_only = pytest.mark.skipif(state_files.fcntl is None, reason="stale temp files are found by flock (POSIX)")


def _trained(n=64, params=2, seed=0):
    rng = np.random.default_rng(seed)
    params = {f"p{i}": rng.standard_normal(n).astype(np.float32) for i in range(params)}
    opt = xopt.Adam(lr=0.01)
    for _ in range(2):
        opt.update(params, {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()})
    return opt, params


def _temps(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


def _child(code, *args, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env, **kwargs)


# -- a save that fails or is interrupted leaves the old file and no temp file, and names the path -----------------
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt(),
                                   MemoryError()], ids=["ENOSPC", "KeyboardInterrupt", "MemoryError"])
def test_a_save_interrupted_while_writing_leaves_the_old_file_and_no_temp_file(error, tmp_path, monkeypatch):
    opt, _ = _trained(n=2**21)  # buffers of 8 MiB: each written on its own
    path = tmp_path / "s.npz"
    opt.save(path)
    old = path.read_bytes()
    writes = []

    def fails_on_the_second_block(member, a):
        writes.append(a.nbytes)
        if len(writes) == 2:
            raise error
        return real(member, a)

    real = state_write._write_block
    monkeypatch.setattr(state_write, "_write_block", fails_on_the_second_block)
    with pytest.raises(type(error)) as caught:
        opt.save(path)
    assert len(writes) == 2 and path.read_bytes() == old and os.listdir(tmp_path) == ["s.npz"]
    if isinstance(error, OSError):
        assert caught.value.errno == errno.ENOSPC and str(path) in str(caught.value)
    monkeypatch.undo()
    opt.update({k: np.ones(2**21, np.float32) for k in ("p0", "p1")},
               {k: np.ones(2**21, np.float32) for k in ("p0", "p1")})
    opt.save(path)  # the optimizer is not left locked
    assert xopt.load_state(path)["iter"] == 3


def test_a_file_too_large_for_the_limit_raises_naming_the_path_and_leaves_no_temp_file(tmp_path):
    """A real write error from the kernel (EFBIG under RLIMIT_FSIZE, as ENOSPC on a full disk)."""
    child = _child("""
        import errno, resource, signal, sys
        import numpy as np, xopt
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        opt = xopt.Adam()
        p = {"W": np.zeros(2**20, np.float32)}
        opt.update(p, {"W": np.ones(2**20, np.float32)})
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
        try:
            opt.save(sys.argv[1])
        except OSError as exc:
            print(exc.errno == errno.EFBIG, sys.argv[1] in str(exc), type(exc).__name__)
    """, tmp_path / "big.npz", stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate(timeout=120)
    assert out.split() == ["True", "True", "OSError"] and os.listdir(tmp_path) == []


def test_a_directory_in_the_way_raises_naming_it_and_writes_nothing(tmp_path):
    opt, _ = _trained()
    (tmp_path / "s.npz").mkdir()
    with pytest.raises(IsADirectoryError, match="s.npz"):
        opt.save(tmp_path / "s.npz")
    assert os.listdir(tmp_path) == ["s.npz"] and os.listdir(tmp_path / "s.npz") == []


def test_a_missing_directory_raises_naming_the_path(tmp_path):
    opt, _ = _trained()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere" / "s.npz")):
        opt.save(tmp_path / "nowhere" / "s.npz")


def test_no_permission_raises_naming_the_path(tmp_path, monkeypatch):
    opt, _ = _trained()

    def refused(path, *args, **kwargs):  # the temp file's open (tests run as root, which permissions do not stop)
        if str(path).endswith(".tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return open(path, *args, **kwargs)

    monkeypatch.setattr(state_files, "open", refused, raising=False)
    with pytest.raises(PermissionError, match=str(tmp_path / "s.npz")):
        opt.save(tmp_path / "s.npz")
    assert os.listdir(tmp_path) == []


def test_what_a_file_cannot_hold_is_refused_before_a_temp_file_is_made(tmp_path):
    opt, _ = _trained()
    opt.state["p0"]["m"] = np.array(["a"] * 64)
    with pytest.raises(TypeError, match="state 'm' of param 'p0' has dtype <U1"):
        opt.save(tmp_path / "s.npz")
    assert os.listdir(tmp_path) == []


# -- stale temp files -------------------------------------------------------------------------------------------------
@posix_only
def test_a_save_removes_the_temp_files_killed_saves_of_its_target_left_and_nothing_else(tmp_path):
    opt, _ = _trained()
    stale = [".s.npz.0123456789ab.tmp", ".s.npz.ffffffffffff.tmp"]
    others = [".t.npz.0123456789ab.tmp",  # another target's
              ".s.npz.0123456789ab.tmp.keep", ".s.npz.0123456789a.tmp", ".s.npz.0123456789AB.tmp",  # not the pattern
              "s.npz.0123456789ab.tmp", ".x.s.npz.0123456789ab.tmp", "notes.txt"]
    for name in stale + others:
        (tmp_path / name).write_bytes(b"PK\x03\x04 half a file")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".s.npz.0123456789ab.tmp").write_bytes(b"another directory's")
    os.symlink(tmp_path / "notes.txt", tmp_path / ".s.npz.aaaaaaaaaaaa.tmp")  # a link of that name: not a temp file
    assert state_files.stale_temp_files(tmp_path / "s.npz") == sorted(str(tmp_path / n) for n in stale)
    opt.save(tmp_path / "s.npz")
    assert sorted(os.listdir(tmp_path)) == sorted(others + ["s.npz", "sub", ".s.npz.aaaaaaaaaaaa.tmp"])
    assert os.listdir(tmp_path / "sub") == [".s.npz.0123456789ab.tmp"]


@pytest.mark.parametrize("length", [237, 238, 251])
def test_a_target_whose_name_leaves_no_room_for_the_temp_files_saves(length, tmp_path):
    """A name of up to 255 bytes is a file's; its temp file's name (18 bytes longer) takes a prefix of it and
    its hash where it would not fit, and the next save finds a killed save's temp file by that name too."""
    opt, params = _trained()
    base = "L" * (length - 4) + ".npz"
    with open(tmp_path / base, "wb"):
        pass  # the file system takes the name itself
    stem = state_files._stem(base)
    assert (stem == base) is (length + 18 <= 255) and len(stem) + 18 <= 255
    stale = tmp_path / f".{stem}.0123456789ab.tmp"
    stale.write_bytes(b"PK\x03\x04 half a file")
    opt.save(tmp_path / base)
    assert sorted(os.listdir(tmp_path)) == [base]
    fresh = xopt.Adam()
    fresh.load(tmp_path / base, params=params)
    assert fresh.iter == opt.iter


@posix_only
def test_the_temp_file_of_a_live_save_in_another_process_stays(tmp_path):
    """Another process is writing its temp file of the same target (it holds the lock): a save leaves it."""
    child = _child("""
        import sys
        from xopt import state_files
        fd, tmp = state_files._new_temp(sys.argv[1], "s.npz")
        print(tmp, flush=True)
        sys.stdin.readline()  # until the parent has saved
    """, tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        live = child.stdout.readline().strip()
        assert os.path.exists(live)
        opt, _ = _trained()
        opt.save(tmp_path / "s.npz")
        assert os.path.exists(live) and state_files.stale_temp_files(tmp_path / "s.npz") == []
    finally:
        child.communicate("done\n", timeout=60)
    assert state_files.stale_temp_files(tmp_path / "s.npz") == [live]  # its process ended without removing it
    opt.save(tmp_path / "s.npz")
    assert _temps(tmp_path) == []


@posix_only
def test_the_temp_file_of_a_live_save_in_another_thread_stays(tmp_path, monkeypatch):
    """Two threads save the same target: neither removes the other's temp file, and both succeed."""
    opt_a, _ = _trained(seed=1)
    opt_b, _ = _trained(seed=2)
    inside, go_on = threading.Event(), threading.Event()
    real = state_write.write

    def slow(f, laid_out):
        if threading.current_thread().name == "a":
            inside.set()
            assert go_on.wait(30)
        return real(f, laid_out)

    monkeypatch.setattr(state_write, "write", slow)
    monkeypatch.setattr(xopt.state_io, "write", slow)
    errors = []
    a = threading.Thread(target=lambda: _catching(errors, opt_a.save, tmp_path / "s.npz"), name="a")
    a.start()
    assert inside.wait(30)
    (live,) = _temps(tmp_path)
    opt_b.save(tmp_path / "s.npz")  # cleans up before it writes: a's temp file is live
    assert _temps(tmp_path) == [live]
    go_on.set()
    a.join(30)
    assert not errors and _temps(tmp_path) == []
    assert np.array_equal(xopt.load_state(tmp_path / "s.npz")["state"]["p0"]["m"], opt_a.state["p0"]["m"])


def _catching(errors, f, *args):
    try:
        f(*args)
    except BaseException as exc:  # noqa: BLE001 (handed to the test)
        errors.append(exc)


@posix_only
def test_a_temp_file_removed_as_stale_before_its_save_locked_it_is_made_again(tmp_path, monkeypatch):
    """The window between creating a temp file and locking it: a cleaner that got in there removed it; the
    save sees that its name no longer leads to its file and makes another."""
    real, calls = state_files._lock, []

    def a_cleaner_first(fd, wait):
        if wait and not calls:
            calls.append(fd)
            (name,) = _temps(tmp_path)  # a cleaner in another process takes the not yet locked file for stale
            os.unlink(tmp_path / name)
        return real(fd, wait)

    monkeypatch.setattr(state_files, "_lock", a_cleaner_first)
    fd, tmp = state_files._new_temp(str(tmp_path), "s.npz")
    try:
        assert calls and os.path.exists(tmp) and _temps(tmp_path) == [os.path.basename(tmp)]
        assert state_files.stale_temp_files(tmp_path / "s.npz") == []  # locked now
    finally:
        state_files._discard(tmp, fd)


@posix_only
@pytest.mark.slow  # a hunt: 4 children killed at random moments while they save
def test_saves_killed_at_random_points_leave_no_temp_file_after_the_next_save(tmp_path):
    """SIGKILL during saves (a 64 MiB state here; benchmarks/state_files.py does 512 MiB): the file there is
    always a whole save, and the next save leaves no temp file."""
    path = tmp_path / "s.npz"
    code = """
        import sys
        import numpy as np, xopt
        opt = xopt.Adam()
        p = {f"W{i}": np.zeros(2**22, np.float32) for i in range(2)}
        opt.update(p, {k: np.full(2**22, 1.0, np.float32) for k in p})
        print("ready", flush=True)
        while True:
            opt.save(sys.argv[1])
    """
    rng = np.random.default_rng(0)
    left = 0
    for _ in range(4):
        child = _child(code, path, stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.05, 0.4)))
        child.send_signal(signal.SIGKILL)
        child.wait(60)
        child.stdout.close()
        left += len(_temps(tmp_path))
        if path.exists():
            assert xopt.load_state(path)["iter"] == 1
    opt, _ = _trained()
    opt.save(path)
    assert _temps(tmp_path) == [] and xopt.load_state(path)["iter"] == 2
    print(f"temp files seen after kills: {left}")


# -- memory: neither a save nor a load holds the state twice ---------------------------------------------------------
def _adam_state(count, n):
    opt = xopt.Adam()
    params = {f"W{i}": np.zeros(n, np.float32) for i in range(count)}
    opt.update(params, {k: np.ones(n, np.float32) for k in params})
    return opt, params


def test_a_save_takes_at_most_a_block_more_memory_than_the_state(tmp_path):
    opt, _ = _adam_state(4, 2**22)  # 8 buffers of 16 MiB
    opt.save(tmp_path / "s.npz")  # the first: imports and compilations out of the figure
    tracemalloc.start()
    try:
        opt.save(tmp_path / "s.npz")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 1.2 * 16 * 2**20, f"{peak / 2**20:.1f} MiB"


def test_a_save_of_many_small_buffers_takes_about_a_block(tmp_path):
    opt, _ = _adam_state(2000, 4096)  # 4,000 buffers of 16 KiB: 62.5 MiB
    opt.save(tmp_path / "s.npz")
    tracemalloc.start()
    try:
        opt.save(tmp_path / "s.npz")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 2 * state_write.BLOCK + 4 * 2**20, f"{peak / 2**20:.1f} MiB"


def test_a_load_takes_the_state_and_a_block(tmp_path):
    opt, params = _adam_state(4, 2**22)
    opt.save(tmp_path / "s.npz")
    state_bytes = 8 * 16 * 2**20
    back = xopt.Adam()
    back.load(tmp_path / "s.npz", params=params)
    tracemalloc.start()
    try:
        back = xopt.Adam()
        back.load(tmp_path / "s.npz", params=params)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= state_bytes + 2 * state_write.BLOCK + 2**20, f"{(peak - state_bytes) / 2**20:.1f} MiB over"
    for k, st in opt.state.items():
        assert all(np.array_equal(back.state[k][n], b) for n, b in st.items() if n != "step")


def test_a_loaded_state_is_the_optimizers_own(tmp_path):
    """The arrays read are kept, not copied: writeable, and no two buffers share memory; a second load from the
    same file gives arrays of their own."""
    opt, params = _trained(n=32, params=3)
    opt.save(tmp_path / "s.npz")
    a, b = xopt.Adam(), xopt.Adam()
    a.load(tmp_path / "s.npz", params=params)
    b.load(tmp_path / "s.npz")
    bufs = [x for st in a.state.values() for n, x in st.items() if n != "step"]
    bufs += [x for st in b.state.values() for n, x in st.items() if n != "step"]
    assert all(x.flags.writeable and x.flags.c_contiguous and x.dtype.isnative for x in bufs)
    assert not any(np.shares_memory(x, y) for i, x in enumerate(bufs) for y in bufs[i + 1:])
    for k, st in opt.state.items():
        assert all(np.array_equal(a.state[k][n], v) and np.array_equal(b.state[k][n], v)
                   for n, v in st.items() if n != "step")


def test_load_state_dict_still_copies(tmp_path):
    opt, params = _trained()
    sd = xopt.load_state(_saved(opt, tmp_path))
    back = xopt.Adam()
    back.load_state_dict(sd, params=params)
    assert not np.shares_memory(back.state["p0"]["m"], sd["state"]["p0"]["m"])


def _saved(opt, tmp_path):
    opt.save(tmp_path / "s.npz")
    return tmp_path / "s.npz"


# -- a save reads the state of one moment while another thread steps ---------------------------------------------------
def test_a_save_while_another_thread_steps_holds_the_state_between_two_steps(tmp_path):
    n, steps = 2**16, 60
    rng = np.random.default_rng(3)
    grads = [{k: rng.standard_normal(n).astype(np.float32) for k in ("a", "b", "c")} for _ in range(steps)]
    replay, params = xopt.Adam(), {k: np.zeros(n, np.float32) for k in ("a", "b", "c")}
    snapshots = [None]
    for g in grads:
        replay.update(params, g)
        snapshots.append({k: replay.state[k]["v"].copy() for k in params})
    opt, live = xopt.Adam(), {k: np.zeros(n, np.float32) for k in ("a", "b", "c")}
    done, go = threading.Event(), threading.Event()

    def stepping():
        for i, g in enumerate(grads):
            opt.update(live, g)
            if i == 0:  # the rest once a save has seen a step: the steps are faster than a save on some machines
                go.wait(timeout=30)
        done.set()

    worker = threading.Thread(target=stepping)
    worker.start()
    seen = set()
    while not done.is_set():
        opt.save(tmp_path / "s.npz")
        saved = xopt.load_state(tmp_path / "s.npz")
        if not saved["state"]:
            continue
        k = saved["iter"]
        assert {st["step"] for st in saved["state"].values()} == {k}
        assert all(np.array_equal(saved["state"][p]["v"], snapshots[k][p]) for p in params), k
        seen.add(k)
        go.set()
    worker.join()
    assert seen


# -- caches stay bounded -----------------------------------------------------------------------------------------------
def test_the_buffer_set_cache_stays_bounded_and_keeps_no_schedule():
    params = {"W": np.ones(3)}
    base = xopt.Adam()
    base.update(params, {"W": np.ones(3)})
    sd = base.state_dict()

    class Decay:
        def __init__(self, rate):
            self.rate = rate

        def __call__(self, count):
            return 0.1 * self.rate**count

    kept = []
    for i in range(200):
        schedule = Decay(0.5 + i * 1e-4)
        kept.append(weakref.ref(schedule))
        opt = xopt.Adam(lr=schedule)
        opt.load_state_dict({**sd, "hyperparameters": {**sd["hyperparameters"], "lr": schedule}})
        sd2 = dict(sd, hyperparameters={**sd["hyperparameters"], "lr": xopt.schedules.exponential_decay(
            0.1 + i * 1e-6, 100, 0.5)})
        xopt.Adam().load_state_dict(sd2)
        del opt, schedule
    gc.collect()
    assert len(state_check._BUFFER_SETS) <= 100  # 400 schedules seen
    assert sum(r() is not None for r in kept) == 0


def test_the_buffer_sets_are_those_of_the_configuration_whatever_the_cache_holds():
    """A schedule and a number as lr, options on and off: the cache gives what a fresh search gives."""
    configs = [dict(cls=xopt.SGD, lr=0.1), dict(cls=xopt.SGD, lr=lambda c: 0.1, momentum=0.9),
               dict(cls=xopt.RMSprop, centered=True), dict(cls=xopt.Adam, amsgrad=True),
               dict(cls=xopt.Adam, state_dtype="bfloat16"), dict(cls=xopt.Adam, lr=lambda c: 0.1)]
    expected = []
    for c in configs:
        state_check._BUFFER_SETS.clear()
        args = dict(c)
        expected.append(state_check._buffer_sets(args.pop("cls")(**args)))
    for _ in range(2):
        for c, want in zip(configs, expected):
            args = dict(c)
            assert state_check._buffer_sets(args.pop("cls")(**args)) == want


def test_a_zip_entry_flagged_encrypted_is_not_a_state_file(tmp_path):
    """zipfile raises RuntimeError for an entry whose flag says it is encrypted: load says the file is not a
    state file, as for any other damage, and changes nothing."""
    params = {"w": np.ones(4)}
    opt = xopt.Adam()
    opt.update(params, {"w": np.ones(4)})
    path = tmp_path / "enc.npz"
    opt.save(path)
    data = bytearray(path.read_bytes())
    at = data.rfind(b"PK\x01\x02")  # the last central directory entry
    data[at + 8] |= 1  # its general purpose flags: bit 0, encrypted
    path.write_bytes(bytes(data))
    fresh = xopt.Adam()
    with pytest.raises(ValueError, match="is not an xopt state file"):
        fresh.load(path, params=params)
    assert fresh.state == {} and fresh.iter == 0


@pytest.mark.parametrize("damage", [b"(2400, ", b"(2400,]", b"(2400,}"])
def test_a_damaged_array_header_is_not_a_state_file(damage, tmp_path):
    """A member's .npy header NumPy cannot parse (one byte changed, as on a bad disk: NumPy's header filter
    raises tokenize's TokenError, or a SyntaxError): load says the file is not a state file, changes nothing."""
    params = {"w": np.ones((40, 30), np.float32)}  # m and v: 2,400 float32 in one member
    opt = xopt.Adam()
    opt.update(params, {"w": np.ones((40, 30), np.float32)})
    path = tmp_path / "a.npz"
    opt.save(path)
    data = path.read_bytes()
    assert data.count(b"(2400,)") == 1
    path.write_bytes(data.replace(b"(2400,)", damage))  # as long: the zip's offsets stay right
    fresh = xopt.Adam()
    with pytest.raises(ValueError, match="is not an xopt state file"):
        fresh.load(path, params=params)
    assert fresh.state == {} and fresh.iter == 0


def test_a_schedule_free_file_saved_in_eval_mode_loads_in_eval_mode(tmp_path):
    """state_dict() holds ScheduleFreeAdamW's mode; the file holds it too, so eval(); save(); load(); train()
    resumes the run bit for bit."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(6)
    grads = [{"w": rng.standard_normal(6)} for _ in range(8)]
    straight, p = xopt.ScheduleFreeAdamW(), {"w": p0.copy()}
    for g in grads:
        straight.update(p, g)
    opt, q = xopt.ScheduleFreeAdamW(), {"w": p0.copy()}
    for g in grads[:4]:
        opt.update(q, g)
    opt.eval(q)
    opt.save(tmp_path / "sf.npz")
    resumed = xopt.ScheduleFreeAdamW()
    resumed.load(tmp_path / "sf.npz", params=q)
    assert resumed.training is False
    resumed.train(q)
    for g in grads[4:]:
        resumed.update(q, g)
    np.testing.assert_array_equal(q["w"], p["w"])
    opt.train(q)
    opt.save(tmp_path / "sf_train.npz")
    again = xopt.ScheduleFreeAdamW()
    again.load(tmp_path / "sf_train.npz", params=q)
    assert again.training is True


@pytest.mark.parametrize("keys", [[("layer1", "W"), ("layer1", "b"), ("head", ("out", 0))],
                                  [np.int64(0), np.int64(1), np.int32(2)]])
def test_keys_update_takes_save_and_load(keys, tmp_path):
    """A flattened pytree's path (a tuple) and NumPy integers name params as well as str and int do; a file
    keeps them (tuples as JSON lists, NumPy integers as ints) and a resumed run is the uninterrupted one."""
    rng = np.random.default_rng(0)
    p0 = {k: rng.standard_normal(3 + i) for i, k in enumerate(keys)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in p0.items()} for _ in range(4)]
    straight, p = xopt.Adam(), {k: v.copy() for k, v in p0.items()}
    for g in grads:
        straight.update(p, g)
    first, q = xopt.Adam(), {k: v.copy() for k, v in p0.items()}
    for g in grads[:2]:
        first.update(q, g)
    first.save(tmp_path / "keys.npz")
    resumed = xopt.Adam()
    resumed.load(tmp_path / "keys.npz", params=q)
    assert list(resumed.state) == [int(k) if isinstance(k, np.integer) else k for k in keys]
    for g in grads[2:]:
        resumed.update(q, g)
    for k in keys:
        np.testing.assert_array_equal(q[k], p[k])


def test_a_key_a_file_cannot_hold_is_refused_naming_it(tmp_path):
    opt = xopt.Adam()
    opt.update({1.5: np.ones(2)}, {1.5: np.ones(2)})
    with pytest.raises(TypeError, match="param name 1.5 cannot be saved"):
        opt.save(tmp_path / "bad.npz")
    assert not (tmp_path / "bad.npz").exists()


@pytest.mark.skipif(not hasattr(signal, "setitimer") or state_files.fcntl is None, reason="setitimer, flock")
# The interrupts land anywhere, also in code the garbage collector runs (another library's gc callback, a temp
# file object lost as open() returned, closed by GC): "Exception ignored", which pytest would report.
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_ctrl_c_at_any_moment_of_a_save_leaves_the_file_no_temp_file_and_no_open_file(tmp_path):
    """A KeyboardInterrupt from a signal handler at random moments of many saves: what comes out is the
    KeyboardInterrupt (zipfile's close of a half-written archive raised ValueError in its place), no file
    descriptor stays open (one could be lost between os.open or os.dup and keeping its result), and the next
    save leaves no temp file (one kept in the live set forever was never taken for stale)."""
    import random

    params = {"w": np.random.default_rng(0).random(1000).astype(np.float32)}
    opt = xopt.Adam()
    opt.update(params, {"w": np.ones(1000, np.float32)})
    target = tmp_path / "ck.npz"
    opt.save(target)
    open_files = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    rnd, wrong = random.Random(0), []
    try:
        for _ in range(1500):
            try:
                try:
                    signal.setitimer(signal.ITIMER_REAL, rnd.uniform(0.00005, 0.0006))
                    opt.save(target)
                except KeyboardInterrupt:
                    pass
                except BaseException as exc:  # noqa: BLE001 (the test's finding)
                    wrong.append(repr(exc))
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except KeyboardInterrupt:  # after save returned: this loop's own window
                pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    opt.save(target)
    gc.collect()
    assert wrong == []
    assert _temps(tmp_path) == []
    if open_files is not None:
        assert len(os.listdir("/proc/self/fd")) == open_files
    assert xopt.load_state(target)["iter"] == 1


@pytest.mark.parametrize("cls,name,value", [(xopt.NAdam, "beta1", 0.5), (xopt.ScheduleFreeAdamW, "lr", 0.01)])
@pytest.mark.parametrize("through", ["state_dict", "file"])
def test_a_resume_continues_a_lagging_params_running_values_exactly(cls, name, value, through, tmp_path):
    """A param behind its set's count (no grad for a while) reads the running product (NAdam) or sums
    (ScheduleFreeAdamW) kept at its own count, made with the hyperparameters of then: a state kept only the
    last count's, so after a change of beta1 or lr a resumed run recomputed the lagging param's from step 1 with
    today's values."""
    def steps(opt, params, counts, keys):
        for s in counts:
            opt.update({k: params[k] for k in keys}, {k: np.full(3, 0.1 * (s + 1)) for k in keys})

    opt = cls()
    params = {"W": np.ones(3), "N": np.ones(3)}
    steps(opt, params, range(3), ["W", "N"])
    steps(opt, params, range(3, 5), ["W"])
    setattr(opt, name, value)
    resumed = cls()
    if through == "file":
        opt.save(tmp_path / "s.npz")
        resumed.load(tmp_path / "s.npz")
    else:
        resumed.load_state_dict(opt.state_dict())
    twin = {k: v.copy() for k, v in params.items()}
    steps(opt, params, range(5, 7), ["W", "N"])
    steps(resumed, twin, range(5, 7), ["W", "N"])
    for k in params:
        np.testing.assert_array_equal(twin[k], params[k])


def test_a_malformed_kept_values_field_is_refused_naming_it():
    opt = xopt.NAdam()
    params = {"W": np.ones(3)}
    opt.update(params, {"W": np.ones(3)})
    sd = opt.state_dict()
    for bad in ("2:zz", "0:0x1p-1", "2:0x1p-1:0x1p-1", 3):
        with pytest.raises(TypeError, match="mu_products"):
            xopt.NAdam().load_state_dict({**sd, "mu_products": bad})
