"""The typer application every command module registers on, and the error boundary."""

from __future__ import annotations

import errno
import re
import sys
import tomllib
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
        args = sys.argv[1:] if argv is None else argv
        _error(name_the_setting(name_the_flag(str(exc), args), args))
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


def _workspace_arg(argv: list[str]) -> Path:
    for i, a in enumerate(argv):
        if a in ("-w", "--workspace") and i + 1 < len(argv):
            return Path(argv[i + 1])
        if a.startswith("--workspace="):
            return Path(a.split("=", 1)[1])
    return Path(".")


def name_the_setting(message: str, argv: list[str]) -> str:
    """ "n must be …, got 0." reads "<ws>/router.toml: [certify] n must be …" when exactly one
    table of the workspace's router.toml sets ``n`` to the value the sentence names: the
    sentence then says where to change it. Anything else is left as it is."""
    head, sep, rest = message.partition(" ")
    got = re.search(r"got (.+?)\.?$", rest)
    if not head.isidentifier() or got is None:
        return message
    path = _workspace_arg(argv) / "router.toml"
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return message
    tables = [
        name
        for name, table in doc.items()
        if isinstance(table, dict) and head in table and repr(table[head]) == got.group(1)
    ]
    if len(tables) != 1:
        return message
    return f"{path}: [{tables[0]}] {head}{sep}{rest}"


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
