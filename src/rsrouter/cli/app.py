"""The typer application every command module registers on, and the error boundary."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from rsrouter.errors import UsageError

app = typer.Typer(
    name="router",
    help="Dual randomized smoothing: route among expert RS models, certify, publish.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

# options most commands take
WORKSPACE = typer.Option(Path("."), "--workspace", "-w", help="The workspace folder.")
DEVICE = typer.Option("auto", help="cpu, cuda, cuda:K or auto.")


@app.callback()
def _root() -> None:
    """Dual randomized smoothing: route among expert RS models, certify, publish."""


def run(argv: list[str] | None = None) -> int:
    """Run the app; a UsageError becomes one sentence on stderr and exit status 1."""
    try:
        app(args=argv, prog_name="router")
    except UsageError as exc:
        # escaped: messages quote TOML tables ([router], [[experts]]) that rich would eat
        err_console.print(
            f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        return 1
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    return 0
