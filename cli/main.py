"""The `stitchnet-tf` command line: thin wrappers that parse options and call the library."""

from __future__ import annotations

import signal
import threading

import click

from stitchnet_tf import __version__
from stitchnet_tf.errors import DataError, Terminated, TrainingError, on_sigterm
from stitchnet_tf_cli import console  # before anything imports TensorFlow: a quiet start-up


class _Group(click.Group):
    """Turns `DataError`s and bad options into a one-line `error: ...` and exit code 2, an
    interrupt into exit 130, and any other exception into one `error: internal error: ...`
    line and exit 1 (the traceback only with `--debug`)."""

    def invoke(self, ctx: click.Context):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)
        try:
            return super().invoke(ctx)
        except (DataError, TrainingError) as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except Terminated:
            click.echo("error: terminated", err=True)
            ctx.exit(143)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)
        except click.UsageError as e:  # a bad option: one line naming it, before any work
            click.echo(f"error: {e.format_message()}", err=True)
            ctx.exit(2)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:
            if ctx.params.get("debug"):
                raise
            message = " ".join(str(e).split()) or "(no message)"
            if len(message) > 300:
                message = message[:297] + "..."
            click.echo(
                f"error: internal error: {type(e).__name__}: {message} "
                "(rerun with --debug for the traceback)",
                err=True,
            )
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stitchnet-tf")
@click.option("--debug", is_flag=True, help="Show the traceback of an internal error.")
@click.option(
    "--quiet",
    "-q",
    is_flag=True,
    help="No progress bars or informational lines: only results, warnings and errors.",
)
@click.option(
    "--verbose",
    "-v",
    is_flag=True,
    help="Also show TensorFlow's start-up lines and the library warnings hidden by default.",
)
def cli(debug: bool, quiet: bool, verbose: bool) -> None:
    """StitchNet: semi-supervised COVID-19 lung CT segmentation (Keras 3 / TensorFlow).

    Classes: background (outside the lung field), healthy lung, ground-glass opacity (GGO),
    consolidation. Run `stitchnet-tf COMMAND --help` for each command. The options below go
    before the command: `stitchnet-tf -q predict ...`.
    """
    console.configure(verbose=verbose, quiet=quiet)


def _register() -> None:
    from stitchnet_tf_cli import data, models, train

    for command in (
        data.demo_data,
        data.preprocess,
        data.split,
        train.train,
        models.evaluate,
        models.predict,
        models.styles,
        models.sample,
        train.demo,
        models.export,
        models.list_models,
    ):
        cli.add_command(command)


_register()


def main() -> None:
    """Console entry point."""
    cli(prog_name="stitchnet-tf")


if __name__ == "__main__":
    main()
