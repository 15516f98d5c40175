"""The command lines' entry points: `logitstore` and `trainer` (pyproject.toml's [project.scripts]).

Loading the command line takes seconds (torch, torchvision, zarr). A Ctrl-C in that time would print
Python's traceback of the import; here it is one line and exit 130, as during a command. This module
imports nothing heavy itself (`logitstore`'s package imports only its errors).

Before torch loads, the commands also ask its CPU allocator for transparent huge pages on its large blocks
(`THP_MEM_ALLOC_ENABLE`, which torch reads once, at its first allocation, so it cannot be set later): a batch's
activations and images are then faulted in 2 MiB at a time, not 4 KiB. A CPU dump of 20,000 small images took
0.37 rather than 1.96 million page faults and 10.85 rather than 14.44 s (benchmarks/RESULTS.md, "Round 8"). The
kernel grants them only where its setting allows (`madvise` or `always`); THP_MEM_ALLOC_ENABLE=0 turns it off.
"""
from __future__ import annotations

import importlib
import os
import sys


def configure_process() -> None:
    """What the commands set for their process before torch loads (see above)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _run(module: str, prog: str) -> None:
    configure_process()
    try:
        main = importlib.import_module(module).main
    except KeyboardInterrupt:
        print(f"{prog}: interrupted while starting; nothing was done", file=sys.stderr)
        sys.exit(130)
    main(prog_name=prog)


def logitstore() -> None:
    _run("logitstore.cli", "logitstore")


def trainer() -> None:
    _run("trainer.cli", "trainer")
