"""`asyncdepo` command line: argv -> config -> engine.

Subcommands: ``push``, ``pull``, ``resume``, ``status``, ``jobs``, ``sim``, ``bench``, ``login`` and one group
per archive (``asyncdepo pdis ...``). Archive-specific commands live in ``asyncdepo.cli.<archive>``; each
such module may define ``push_main``, ``pull_main``, ``group_main`` and ``login_main`` taking the remaining
argv and returning an exit status. This module only dispatches.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# archive name -> module holding its commands
ARCHIVES: dict[str, str] = {
    "pdis": "asyncdepo.cli.pdis",
    "gypsum": "asyncdepo.cli.gypsum",
    "empiar": "asyncdepo.cli.empiar",
    "immport": "asyncdepo.cli.immport",
}


def _archive_entry(archive: str, entry: str) -> Callable[[list[str]], int] | None:
    try:
        module = importlib.import_module(ARCHIVES[archive])
    except ModuleNotFoundError as exc:
        if exc.name == ARCHIVES[archive]:
            return None
        raise
    fn: Callable[[list[str]], int] | None = getattr(module, entry, None)
    return fn


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``asyncdepo`` console script; returns the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    from asyncdepo.cli import generic

    if len(args) >= 2 and args[0] in ("push", "pull", "login") and args[1] in ARCHIVES:
        fn = _archive_entry(args[1], f"{args[0]}_main")
        if fn is None:
            print(f"asyncdepo: {args[0]} {args[1]} is not available", file=sys.stderr)
            return 2
        return fn(args[2:])
    if args and args[0] in ARCHIVES:
        fn = _archive_entry(args[0], "group_main")
        if fn is None:
            print(f"asyncdepo: no '{args[0]}' commands", file=sys.stderr)
            return 2
        return fn(args[1:])
    return generic.main(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
