"""The typer app: every `sbx` command but the hot `exec` path (see entry.py)."""

from __future__ import annotations

import sys

import typer

from .errors import SbxError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="sbx: a rootless-first sandbox for untrusted code.",
)


@app.command(
    "exec",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def exec_command(ctx: typer.Context) -> None:
    """Run a command in a fresh sandbox (see `sbx exec --help`)."""
    from .entry import exec_main

    raise typer.Exit(exec_main(list(ctx.args)))


def run_app(args: list[str]) -> int:
    try:
        app(args, prog_name="sbx", standalone_mode=False)
    except SbxError as e:
        print(f"sbx: error: {e}", file=sys.stderr)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # click's usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        raise
    return 0
