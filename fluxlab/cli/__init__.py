"""The `fluxlab` command line: one Typer app, one module per command group, each command a thin shell over
fluxlab.service (parse -> service -> print).

torch, diffusers and transformers are imported inside commands, never at module level, so `fluxlab --help`
answers instantly.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from ..errors import UserError

app = typer.Typer(
    name="fluxlab",
    help="A lab for FLUX image models: generate, inspect, compare, train, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def say(msg: str) -> None:
    err.print("[yellow]note:[/yellow] " + escape(msg))


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(str(text))


def main(argv: list[str] | None = None) -> int:
    """Console-script entry: one line and exit 2 for user errors, 130 on Ctrl-C, never a traceback for those."""
    from ..runtime.loading import quiet_logging
    from ..service.events import Cancelled

    quiet_logging()
    for console in (out, err):  # into a file or a pipe, tables keep every name and number whole
        if not console.is_terminal:
            console.width = max(console.width, 200)
    try:
        # Without standalone mode typer returns the exit code (130 after Ctrl-C) instead of exiting.
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code == 130:
            err.print("interrupted")
        return code if isinstance(code, int) else 0
    except UserError as e:
        err.print("[red]error:[/red] " + escape(" ".join(str(e).split("\n"))))
        return 2
    except typer.TyperException as e:  # click usage errors (typer vendors click): bad flag, bad number
        if type(e).__name__ == "NoArgsIsHelpError":
            e.show()
            return 0
        message = " ".join(e.format_message().split("\n"))
        given = _given_value(e, sys.argv[1:] if argv is None else argv)
        if given is not None and repr(given) not in message:
            message += f" (got {given!r})"
        err.print("[red]error:[/red] " + escape(message))
        return 2
    except (KeyboardInterrupt, typer.Abort, Cancelled):
        err.print("interrupted")
        return 130
    except typer.Exit as e:
        return e.exit_code


def _given_value(e, argv) -> str | None:
    """The value the user gave for the option a usage error is about (click's message does not always say)."""
    opts = getattr(getattr(e, "param", None), "opts", None) or []
    args = [str(a) for a in argv]
    for i, a in enumerate(args):
        for opt in opts:
            if a == opt and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(opt + "="):
                return a.split("=", 1)[1]
    return None


def run() -> None:
    sys.exit(main())


from . import batch, generate, grid, info, lora, presets, quantize, serve, train  # noqa: E402, F401  (each registers its commands)
