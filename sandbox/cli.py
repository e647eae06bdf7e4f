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


profile_app = typer.Typer(no_args_is_help=True, help="List, show and check profiles.")
app.add_typer(profile_app, name="profile")


@profile_app.command("list")
def profile_list() -> None:
    """The named profiles and what each is for."""
    from . import profiles

    for name in profiles.list_profiles():
        description = profiles.resolve(name).get("description", "")
        typer.echo(f"{name:<12} {description}")


@profile_app.command("show")
def profile_show(name: str = typer.Argument(..., help="profile name or path")) -> None:
    """A profile fully resolved (parents applied), as JSON."""
    import json

    from . import profiles

    typer.echo(json.dumps(profiles.resolve(name), indent=2, sort_keys=True))


@profile_app.command("check")
def profile_check(path: str = typer.Argument(..., help="a profile (.toml) or an OCI seccomp policy (.json)")) -> None:
    """Validate a profile or a seccomp policy; errors name the file and the field."""
    from . import profiles, seccomp_policy

    if path.endswith(".json"):
        policy = seccomp_policy.load_policy(path)
        typer.echo(f"{path}: valid seccomp policy ({len(policy.rules)} rules)")
        return
    resolved = profiles.resolve(path)
    if "seccomp" in resolved:
        seccomp_policy.load_policy(resolved["seccomp"])
    typer.echo(f"{path}: valid profile")


@app.command("version")
def version() -> None:
    """Print sbx's version."""
    from . import __version__

    typer.echo(__version__)
