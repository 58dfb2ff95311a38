"""The ``netmeld`` command line: a thin layer over the Python API.

:mod:`netmeld.cli.parser` defines the subcommands and their options, :mod:`netmeld.cli.commands`
what each does, :mod:`netmeld.cli.recipes` the YAML recipes. Errors are printed as one line
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape

from netmeld.cli.parser import build_parser
from netmeld.errors import NetmeldError
from netmeld.members.trust import trusting

_errors = Console(stderr=True, width=120)

__all__ = ["build_parser", "main"]


def _show_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    _errors.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        warnings.showwarning = _show_warning
    try:
        with trusting(getattr(args, "trust_code", False)):
            return int(args.func(args))
    except KeyboardInterrupt:
        _errors.print("interrupted")
        return 130
    except Exception as exc:
        if args.debug:
            raise
        if isinstance(exc, NetmeldError):
            _errors.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            return 2
        if isinstance(exc, OSError):  # disk full, permissions, a vanished file: the system's words
            where = f" ({exc.filename})" if exc.filename else ""
            _errors.print(
                f"[red]error:[/red] {escape(str(exc.strerror or exc))}{escape(where)}",
                highlight=False,
                soft_wrap=True,
            )
            return 2
        _errors.print(
            f"[red]error:[/red] unexpected failure: {escape(str(exc))} (a bug in netmeld: "
            "run with --debug for the traceback and please report it)",
            highlight=False,
            soft_wrap=True,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
