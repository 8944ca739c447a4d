"""The owl-deploy CLI with one fault injected, for tests/test_faults.py (run as a script in a subprocess).

``OWL_FAULT=package.module:function`` wraps that function; ``OWL_FAULT_ACTION`` is ``kill-before`` or
``kill-after``: the process sends itself SIGKILL just before or just after the call, which is a kill at
an exact, repeatable point of a real run (no cleanup code can run, as with the OOM killer or a power cut).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys


def _inject() -> None:
    target = os.environ.get("OWL_FAULT")
    if not target:
        return
    module_name, attr = target.split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, attr)
    action = os.environ.get("OWL_FAULT_ACTION", "kill-after")

    def wrapped(*args, **kwargs):
        if action == "kill-before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if action == "kill-after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(module, attr, wrapped)


if __name__ == "__main__":
    _inject()
    from owl_deploy.cli import main

    sys.argv[0] = "owl-deploy"
    main()
