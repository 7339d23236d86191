"""The ``localllm`` command. Commands parse, call one library function, print.

Every error a user can cause ends as one line on stderr with the next step,
and a non-zero exit; ``LOCALLLM_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import sys

import click

from localllm import __version__, settings
from localllm.errors import LocalLLMError

# exit codes: 1 = a LocalLLMError (user-fixable), 2 = usage (click), 70 = a bug, 130 = interrupted
EXIT_ERROR, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPT = 1, 2, 70, 130


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="localllm")
def cli() -> None:
    """localllm: run LLMs locally, CPU first.

    \b
    localllm run [MODEL] [PROMPT]     chat or complete in the terminal
    localllm doctor                   check this machine and the llama.cpp build
    localllm bench / eval MODEL       speed and quality, measured on this machine
    """


def register_commands() -> None:
    """Add every command to the ``cli`` group (the entry point does it first; tests that walk
    the commands call it too). Each command module imports only when present."""
    from localllm.cli import doctor, run

    for mod in (run, doctor):
        cli.add_command(mod.command)
    # commands added by later modules register themselves the same way
    import importlib

    for name in ("convert", "models", "serve", "plan", "measure"):
        try:
            mod = importlib.import_module(f"localllm.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"localllm.cli.{name}":
                raise
            continue
        for c in getattr(mod, "commands", None) or [mod.command]:
            cli.add_command(c)


def _fail(message: str, hint: str | None, code: int) -> None:
    line = f"error: {message}"
    if hint:
        line += f" (next: {hint})"
    click.echo(line, err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point (console script and ``python -m localllm``)."""
    register_commands()
    try:
        rv = cli.main(args=argv, prog_name="localllm", standalone_mode=False)
        sys.exit(rv if isinstance(rv, int) else 0)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPT)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except LocalLLMError as e:
        if settings.debug():
            raise
        _fail(e.message, e.hint, EXIT_ERROR)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPT)
    except BrokenPipeError:
        sys.exit(0)  # e.g. `localllm run ... | head`
    except OSError as e:
        if settings.debug():
            raise
        _fail(f"{e.strerror or e} ({e.filename})" if e.filename else str(e), None, EXIT_ERROR)
    except Exception as e:  # a bug: say so, briefly
        if settings.debug():
            raise
        _fail(f"internal error: {type(e).__name__}: {e}",
              "rerun with LOCALLLM_DEBUG=1 and report the traceback", EXIT_BUG)
