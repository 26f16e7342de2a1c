"""The one `duetgen` command. Sub-commands import their heavy modules lazily so `--help` is fast.

Each area adds its commands here as thin functions that parse options and call library code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help="DuetGen: interleaved text-and-image generation (an MLLM writes, a video DiT draws).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(help="Build, convert and view interleaved datasets.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate interleaved outputs.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")


def fail(msg: str) -> None:
    """Print a clear error and exit 2 (bad input), without a traceback."""
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


# ----------------------------------------------------------------------------- data


# ----------------------------------------------------------------------------- eval


# ----------------------------------------------------------------------------- demo


if __name__ == "__main__":  # pragma: no cover
    app()
