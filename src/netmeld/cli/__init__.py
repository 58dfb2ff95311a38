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
        _errors.print(
            f"[red]error:[/red] {type(exc).__name__}: {escape(str(exc))} "
            "(run with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
