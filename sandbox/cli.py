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


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(__version__)
        raise typer.Exit(0)


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="print the version"
    ),
) -> None:
    """sbx: a rootless-first sandbox for untrusted code."""


@app.command(
    "exec",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def exec_command(ctx: typer.Context) -> None:
    """Run a command in a fresh sandbox (see `sbx exec --help`)."""
    from .entry import exec_main

    raise typer.Exit(exec_main(list(ctx.args)))


def _register_commands() -> None:
    from . import cli_batch, cli_instances

    cli_batch.register(app)
    cli_instances.register(app)


_register_commands()


def run_app(args: list[str]) -> int:
    try:
        # Without standalone mode, click returns a typer.Exit's code instead of
        # raising it.
        rc = app(args, prog_name="sbx", standalone_mode=False)
        if isinstance(rc, int):
            return rc
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
def profile_check(
    path: str = typer.Argument(..., help="a profile (.toml) or an OCI seccomp policy (.json)"),
) -> None:
    """Validate a profile or a seccomp policy; errors name the file and the field."""
    from . import profiles, seccomp_policy

    if path.endswith(".json"):
        policy = seccomp_policy.load_policy(path)
        count = len(policy.rules)
        typer.echo(f"{path}: valid seccomp policy ({count} rule{'s' * (count != 1)})")
        return
    resolved = profiles.resolve(path)
    if "seccomp" in resolved:
        seccomp_policy.load_policy(resolved["seccomp"])
    typer.echo(f"{path}: valid profile")


rootfs_app = typer.Typer(no_args_is_help=True, help="Import, list, show and remove images.")
app.add_typer(rootfs_app, name="rootfs")


@rootfs_app.command("import")
def rootfs_import(
    source: str = typer.Argument(..., help="a .tar/.tar.gz/.tar.xz, a directory, an OCI "
                                 "layout (directory or tar) or a `docker save` archive"),
    name: str = typer.Option(..., "--name", help="the image's name in the store"),
    replace: bool = typer.Option(False, "--replace", help="replace an image of that name"),
) -> None:
    """Import an image safely into your store (nothing lands outside it)."""
    from . import rootfs

    image = rootfs.import_image(source, name, replace=replace)
    typer.echo(f"imported {image.name}: {_size(image.size_bytes)} from {image.source_format}")
    for note in image.notes:
        typer.echo(f"  note: {note}")


@rootfs_app.command("list")
def rootfs_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """The images in your store."""
    from . import rootfs

    images = rootfs.list_images()
    if as_json:
        import json

        typer.echo(json.dumps([i.to_json() for i in images], indent=2))
        return
    for image in images:
        typer.echo(f"{image.name:<20} {_size(image.size_bytes):>9}  {image.created}  "
                   f"{image.source_format}")


@rootfs_app.command("show")
def rootfs_show(name: str) -> None:
    """One image's manifest, as JSON."""
    import json

    from . import rootfs

    image = rootfs.show_image(name)
    data = image.to_json()
    data["lowerdirs"] = rootfs.image_lowerdirs(name)
    typer.echo(json.dumps(data, indent=2))


@rootfs_app.command("rm")
def rootfs_rm(name: str) -> None:
    """Remove an image (and the layers no other image uses)."""
    from . import rootfs

    rootfs.remove_image(name)
    typer.echo(f"removed {name}")


def _size(n: int) -> str:
    for unit, factor in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.1f}{unit}"
    return f"{n}B"


@app.command("doctor")
def doctor(as_json: bool = typer.Option(False, "--json", help="print the checks as JSON")) -> None:
    """Check what this host lets sbx enforce, and say how to fix what is missing.
    Exits non-zero when `sbx exec` cannot run here."""
    from . import doctor as checks

    results = checks.run_checks()
    typer.echo(checks.render(results, json=as_json))
    raise typer.Exit(checks.exit_code(results))


@app.command("version")
def version() -> None:
    """Print sbx's version."""
    from . import __version__

    typer.echo(__version__)
