"""The typer application every command module registers on, and the error boundary."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from rsrouter.errors import UsageError

app = typer.Typer(
    name="router",
    help="Dual randomized smoothing: route among expert RS models, certify, publish.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help texts name TOML tables ([router]) that markup would eat
)
# soft_wrap: a line is never broken by us, so a command, path, URL or hash the user may copy
# stays whole at any terminal width (the terminal itself may fold it, which copies back whole)
# markup off: what we print (paths, TOML tables such as [router]) is shown literally
console = Console(soft_wrap=True, markup=False)
err_console = Console(stderr=True, soft_wrap=True, markup=False)

# options most commands take
WORKSPACE = typer.Option(Path("."), "--workspace", "-w", help="The workspace folder.")
DEVICE = typer.Option("auto", help="cpu, cuda, cuda:K or auto.")


@app.callback()
def _root() -> None:
    """Dual randomized smoothing: route among expert RS models, certify, publish."""


def run(argv: list[str] | None = None) -> int:
    """Run the app; a UsageError becomes one sentence on stderr and exit status 1, a bad command
    line (unknown option, missing argument, unparsable value) one sentence and status 2."""
    try:
        code = app(args=argv, prog_name="router", standalone_mode=False)
    except UsageError as exc:
        _error(name_the_flag(str(exc), sys.argv[1:] if argv is None else argv))
        return 1
    except typer.Abort:  # Ctrl-C
        _error("aborted.")
        return 1
    except typer.TyperException as exc:  # click's parsing errors, raised as-is without standalone
        message = exc.format_message()
        if message:  # empty for `router` alone, whose help is already printed
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else "router"
            _error(f"{message.rstrip('.')}; see `{where} --help`.")
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    except OSError as exc:  # the machine's faults: a read-only folder, a full disk
        _error(os_error_sentence(exc))
        return 1
    except Exception as exc:
        from safetensors import SafetensorError

        if not isinstance(exc, SafetensorError):
            raise
        _error(  # a reader that did not name its file (each of ours does)
            f"a safetensors file is truncated or corrupt ({str(exc).splitlines()[0]}); "
            "delete it and run the command that writes it again."
        )
        return 1
    return code if isinstance(code, int) else 0  # typer.Exit(code) comes back as a value


def hold_lock(ctx: typer.Context, ws, command: str) -> None:
    """Hold the workspace's lock until the running command (``ctx``) ends: a second long job
    on the same workspace refuses in one sentence that names the holder."""
    ctx.with_resource(ws.lock(command))


def name_the_flag(message: str, argv: list[str]) -> str:
    """ "batch_size must be …" from the Python API reads "--batch-size must be …" when the user
    typed --batch-size: the sentence names what they can change."""
    head, sep, rest = message.partition(" ")
    flag = "--" + head.replace("_", "-")
    typed = any(a == flag or a.startswith(flag + "=") for a in argv)
    return f"{flag}{sep}{rest}" if head.isidentifier() and typed else message


def os_error_sentence(exc: OSError) -> str:
    """One sentence for a file-system fault, naming the file and the fix."""
    if exc.errno == errno.EPIPE:
        return "the output was closed before the command finished (broken pipe)."
    if exc.filename is None and exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        text = (str(exc).strip().splitlines() or [""])[0].rstrip(".") or type(exc).__name__
        return (  # no file named: a network or device fault (requests' errors are OSErrors)
            f"{text} ({type(exc).__name__}); check the network or the device and run the "
            "command again."
        )
    where = exc.filename or "a file"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left on the device while writing {where}; free some space and run the "
            "command again (the work already saved is kept)."
        )
    if exc.errno == errno.EROFS:
        return (
            f"cannot write {where}: the file system is read-only; copy the workspace somewhere "
            "writable and pass that folder with -w."
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"permission denied for {where}; make the workspace writable by you, or copy it "
            "somewhere writable and pass that folder with -w."
        )
    if exc.errno == errno.ENOENT:
        return f"{where} does not exist."
    reason = (exc.strerror or type(exc).__name__).rstrip(".")
    return f"{where}: {reason.lower()}; check the file and run the command again."


def show_table(table: Table) -> None:
    """Print a rich table at its natural width: it fits the terminal when it can and is
    otherwise printed wider (the terminal scrolls or folds whole lines), never squeezed until
    a cell folds one letter per line."""
    natural = console.measure(table, options=console.options.update_width(10_000)).maximum
    if natural <= console.width:
        console.print(table)
        return
    wide = Console(width=natural, markup=False, force_terminal=console.is_terminal)
    wide.print(table, crop=False)


def _error(message: str) -> None:
    err_console.print(Text("error:", style="bold red"), Text(message), highlight=False)
