#!/usr/bin/python3
# hearth python runtime, started ahead of demand: the interpreter and the modules the official
# runtime interface client (awslambdaric) uses are loaded before any function is known; the
# agent then hands over one function's environment and this process becomes that function's
# runtime, exactly as `/var/runtime/bootstrap` (python3 -m awslambdaric "$_HANDLER") would.
#
# Protocol with the agent: this process writes "r" on fd 4 once loaded; fd 3 then carries the
# function's environment (NUL-terminated KEY=VALUE
# entries, then end of file); this process answers on fd 4: "y" (it takes the configuration
# and runs the client) or "n" and the reason (it exits, and the agent starts the bootstrap
# instead). It declines whenever it could not behave exactly like a fresh interpreter: a
# variable it started with has another value, or the function sets one that Python or the C
# library only read when a process starts.
import os
import sys

_STARTUP_ONLY = ("PYTHON", "LC_", "MALLOC_")
# Read when used, not at start: the time zone is read again (time.tzset) after the hand-over,
# and PATH when a program is spawned.
_FOLLOWED = {"TZ", "PATH"}
_STARTUP_ONLY_NAMES = {"LANGUAGE", "LD_PRELOAD", "LD_AUDIT", "GLIBC_TUNABLES", "AWS_LAMBDA_EXEC_WRAPPER"}


def _read_config(fd):
    chunks = []
    while True:
        b = os.read(fd, 65536)
        if not b:
            break
        chunks.append(b)
    env = {}
    for entry in b"".join(chunks).split(b"\0"):
        if entry:
            k, _, v = entry.partition(b"=")
            env[os.fsdecode(k)] = os.fsdecode(v)
    return env


def _refusal(env, started_with):
    """Why this process cannot become the runtime for `env` (None: it can)."""
    for k, v in started_with.items():
        if env.get(k) != v and k not in _FOLLOWED:
            return f"{k} differs from the value this interpreter started with"
    for k in env:
        if k not in started_with and (k.startswith(_STARTUP_ONLY) or k in _STARTUP_ONLY_NAMES):
            return f"{k} is only read when a process starts"
    return None


def main():
    started_with = dict(os.environ)
    # Everything the client imports, loaded now; its own modules are dropped again below,
    # because they read the function's environment when imported.
    import runpy  # noqa: F401  (used after the hand-over)
    import awslambdaric.__main__  # noqa: F401
    for name in [n for n in sys.modules if n == "awslambdaric" or n.startswith("awslambdaric.")]:
        del sys.modules[name]
    import gc

    gc.collect()  # the dropped modules' cycles, before the pool counts this sandbox

    os.write(4, b"r")
    env = _read_config(3)
    os.close(3)
    why = _refusal(env, started_with)
    if why is not None:
        os.write(4, b"n" + why.encode())
        os._exit(0)
    os.write(4, b"y")
    os.close(4)

    os.environ.clear()
    os.environ.update(env)
    # As the bootstrap exports it.
    os.environ["PYTHONPATH"] = "/var/runtime"
    import time

    time.tzset()
    task_root = env.get("LAMBDA_TASK_ROOT") or "/var/task"
    os.chdir(task_root)
    # `python3 -m` puts the working directory first, then PYTHONPATH (this script's directory).
    sys.path.insert(0, task_root)
    import importlib

    importlib.invalidate_caches()
    sys.argv = ["-m", env.get("_HANDLER", "")]
    runpy._run_module_as_main("awslambdaric", alter_argv=True)


main()
