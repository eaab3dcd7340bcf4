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
    help="A lab for FLUX image models: generate, inspect, compare, train, serve. Add --verbose to any command to see "
         "the libraries' own warnings and logs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
def _type_column(self, ctx) -> str | None:
    """The help's type column as people read it: nothing for an on/off flag, the metavar when one is given, else the
    value's kind in capitals (TEXT, INTEGER, FLOAT; '...' for a repeatable option), where typer 0.29 writes its
    Python type (<bool>, <list[str]>)."""
    if getattr(self, "is_flag", False):
        return None
    if self.metavar:
        return self.metavar
    label = str(self.display_type(ctx)).strip("<>")
    many = label.startswith("list[") or getattr(self, "multiple", False)
    label = label.removeprefix("list[").removesuffix("]")
    label = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT"}.get(label, label.upper())
    return label + ("..." if many else "")


typer.core.TyperOption.display_type_rich = _type_column
typer.core.TyperArgument.display_type_rich = _type_column

# emoji off: user values such as a LoRA path ending in ":abc:" are printed as given, never as an emoji
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
out = Console(highlight=False, soft_wrap=True, emoji=False)


def say(msg: str) -> None:
    err.print("[yellow]note:[/yellow] " + escape(msg))


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(str(text))


def main(argv: list[str] | None = None) -> int:
    """Console-script entry: one line and exit 2 for user errors, 130 on Ctrl-C, never a traceback for those."""
    import os

    from ..runtime.loading import quiet_logging
    from ..service.events import Cancelled

    args = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in args:  # every library's own warnings and logs too (FLUXLAB_VERBOSE tells Ray's engine)
        args.remove("--verbose")
        os.environ["FLUXLAB_VERBOSE"] = "1"
    else:
        quiet_logging()
    argv = args
    try:
        check_environment()
    except UserError as e:
        err.print("[red]error:[/red] " + escape(str(e)))
        return 2
    for console in (out, err):  # into a file or a pipe, tables keep every name and number whole
        if not console.is_terminal:
            console.width = max(console.width, 200)
    from ..runtime import threads

    threads.defer_notes()  # a busy machine is said after the work succeeded, never before an error line
    try:
        # Without standalone mode typer returns the exit code (130 after Ctrl-C) instead of exiting.
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code == 130:
            err.print("interrupted")
        code = code if isinstance(code, int) else 0
        note = threads.take_note(code == 0)
        if note:
            say(note)
        return code
    except UserError as e:
        threads.take_note(False)
        err.print("[red]error:[/red] " + escape(" ".join(str(e).split("\n"))))
        return 2
    except OSError as e:
        import errno

        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        err.print("[red]error:[/red] " + escape(f"the disk is full{where}; nothing partial was kept; free some "
                                                 f"space and run it again"))
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


def check_environment() -> None:
    """Thread counts from the environment, checked before torch starts: the OpenMP runtime would otherwise print
    its own warning lines for a bad value and carry on with a default."""
    import os

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "FLUXLAB_THREADS"):
        value = os.environ.get(name)
        if value is not None and not (value.strip().isdigit() and int(value) >= 1):
            raise UserError(f"{name}={value!r} is not a positive whole number; set it to a thread count (e.g. 2) "
                            f"or unset it")


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


from . import batch, caption, generate, grid, info, lora, presets, quantize, serve, train  # noqa: E402, F401  (each registers its commands)
