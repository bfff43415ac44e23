"""Entry point of the `router` command: imports every command module, then runs the app."""

from __future__ import annotations

import sys

from rsrouter.cli import certify, demo, experts, hub, train  # noqa: F401  (registers commands)
from rsrouter.cli.app import app, run

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
