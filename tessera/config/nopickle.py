"""The run-time no-pickle guard: with ``TESSERA_FORBID_PICKLE=1``, unpickling ends the process.

Tessera never unpickles (its messages are typed msgpack, its files safetensors
and JSON); a scan of the source checks what Tessera itself calls, and this guard
checks what actually runs, libraries included (torch's object collectives,
``recv_pyobj``, ...). Tests set the variable; every process a launcher starts
then installs the guard before anything else runs (:func:`main`, the
launchers' wrapper, and the entry points :mod:`tessera.cluster.role` and
:mod:`tessera.train.trainer` once more), so that:

* ``pickle.loads``, ``pickle.load`` and ``pickle.Unpickler`` (and their C and
  pure-Python twins, and the ``_unpickler`` torch.distributed keeps) end the
  process (the classes become subclasses whose ``__init__`` and ``load`` do);
* an audit hook ends it on the ``pickle.find_class`` event, which every
  unpickler raises when it resolves a class, whoever holds a reference to it.

Ending the process (one line naming the guard and the caller on stderr, exit
code :data:`EXIT_CODE`) rather than raising means no ``except`` on the way can
swallow it: the job, and the test, fail.

    python -m tessera.config.nopickle -m MODULE [ARGS...]
    python -m tessera.config.nopickle SCRIPT [ARGS...]

runs MODULE or SCRIPT as ``python`` would, with the guard installed first.

Pickling itself (``pickle.dumps``) is left alone: it runs no code of a peer's.
It sits in the config layer next to :mod:`tessera.config.env`, which reads the
variable, so every layer's entry point can install it.
"""

from __future__ import annotations

import os
import pickle  # the guard replaces its loaders; it never loads anything
import sys
import traceback
from typing import Mapping, NoReturn

from tessera.config import env as envvars

#: This module, as ``python -m`` names it.
MODULE = "tessera.config.nopickle"
#: Exit code of a process the guard ended.
EXIT_CODE = 86
#: What the guard replaces in each module, when the module is loaded.
TARGETS = {
    "pickle": ("loads", "load", "Unpickler", "_loads", "_load", "_Unpickler"),
    "_pickle": ("loads", "load", "Unpickler"),
    "torch.distributed.distributed_c10d": ("_unpickler",),
    "torch.distributed.rpc.internal": ("_unpickler",),
    "multiprocessing.reduction": ("ForkingPickler.loads",),
}
#: Marks the replacements (installing twice changes nothing).
MARK = "_tessera_forbids_pickle"


def _die(what: str) -> NoReturn:
    stack = "".join(traceback.format_stack(limit=8)[:-2])
    sys.stderr.write(f"{envvars.FORBID_PICKLE} is set and this process tried to unpickle "
                     f"({what}); nothing in Tessera may unpickle. Called from:\n{stack}")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(EXIT_CODE)


def _forbidden_function(name: str):
    def forbidden(*_args, **_kwargs):
        _die(name)
    setattr(forbidden, MARK, True)
    forbidden.__name__ = forbidden.__qualname__ = name.rsplit(".", 1)[-1]
    return forbidden


class _Forbidding:
    """Mixed into a subclass of each unpickler class: making or using one ends the
    process. A subclass, not a stand-in, so modules that subclass the unpickler at
    import (or read its attributes, as joblib does ``Unpickler.dispatch``) still import."""

    _tessera_forbids_pickle = True

    def __init__(self, *_args, **_kwargs):
        _die(f"{type(self).__qualname__}()")

    def load(self):
        _die(f"{type(self).__qualname__}.load")


def _forbidden_class(original: type) -> type:
    return type(original.__name__, (_Forbidding, original), {"__module__": __name__})


def _audit(event: str, args) -> None:
    if event == "pickle.find_class":
        _die(f"pickle.find_class{tuple(args)!r}")


def _patch_loaded() -> None:
    for module_name, names in TARGETS.items():
        module = sys.modules.get(module_name)
        if module is None:
            continue
        for dotted in names:
            *path, name = dotted.split(".")
            owner = module
            for part in path:
                owner = getattr(owner, part, None)
            current = getattr(owner, name, None)
            if current is None or getattr(current, MARK, False):
                continue
            replacement = (_forbidden_class(current) if isinstance(current, type)
                           else _forbidden_function(f"{module_name}.{dotted}"))
            setattr(owner, name, replacement)


def installed() -> bool:
    """Whether this process runs under the guard."""
    return getattr(pickle.loads, MARK, False)


def install() -> None:
    """Install the guard in this process (again: re-patch modules loaded since)."""
    first = not installed()
    _patch_loaded()
    if first:
        sys.addaudithook(_audit)


def install_if_asked(environ: Mapping[str, str]) -> bool:
    """Install the guard when ``environ`` asks for it; whether it is installed."""
    if envvars.forbid_pickle(environ):
        install()
        return True
    return False


def wrap_command(cmd: list[str], environ: Mapping[str, str]) -> list[str]:
    """``cmd`` (``[python, -m MODULE | SCRIPT, ARGS...]``) started under the guard when
    ``environ`` asks for it (a launcher's children inherit that environment)."""
    if not envvars.forbid_pickle(environ) or len(cmd) < 2 or cmd[1] == "-c":
        return cmd
    return [cmd[0], "-m", MODULE, *cmd[1:]]


def main(argv: list[str]) -> None:
    """Install the guard, then run ``-m MODULE ARGS`` or ``SCRIPT ARGS`` as python would."""
    import runpy
    install()
    if argv[:1] == ["-m"] and len(argv) > 1:
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv:
        script = os.path.abspath(argv[0])
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(script)  # as `python script.py` does
        runpy.run_path(script, run_name="__main__")
    else:
        sys.exit("usage: python -m tessera.config.nopickle -m MODULE [ARGS...] | "
                 "SCRIPT [ARGS...]")


if __name__ == "__main__":
    main(sys.argv[1:])
