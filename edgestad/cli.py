"""The `edgestad` command. Each sub-command is imported only when it runs, so `edgestad run`
works on a device that has no torch and `edgestad --help` starts fast.

One line per user error, everywhere: every failure a user can cause (a bad option, a damaged
bundle, an unreadable image, a config file that is not UTF-8, ...) prints exactly one
``error: <file or option>: <what is wrong>`` line on stderr and exits 2 (the runtime keeps its
documented codes: 3 source, 4 model, 5 output). Tracebacks only with ``edgestad --debug`` or
``EDGESTAD_DEBUG=1``; an unexpected failure prints one ``error:`` line and exits 1.
"""
from __future__ import annotations

import importlib
import os
import sys

import click

# name → "module:attribute" of a click command
COMMANDS = {
    "pretrain-teacher": "edgestad.train.cli:pretrain_teacher",
    "train": "edgestad.train.cli:train",
    "methods": "edgestad.methods.catalog:methods_command",
    "roi": "edgestad.train.roi:roi_command",
    "evaluate": "edgestad.evaluate:evaluate_command",
    "demo": "edgestad.demo:demo_command",
    "export": "edgestad.export.cli:export",
    "bench": "edgestad.bench.cli:bench_command",
    "run": "edgestad.runtime.cli:run",
    "service": "edgestad.runtime.cli:service",
    "users": "edgestad.runtime.cli:users",
    "synth-defects": "edgestad.synth:synth_defects",
    "thresholds": "edgestad.trust_cli:thresholds",
    "sign": "edgestad.trust_cli:sign",
    "keygen": "edgestad.trust_cli:keygen",
}

HELP = {
    "pretrain-teacher": "Pretrain a patch-descriptor teacher on natural images.",
    "train": "Train a model (--method, default stfpm) on good images; write a bundle.",
    "methods": "List the methods: what each is, its paper, its default backbone.",
    "roi": "Propose a region of interest from the good training images (to confirm).",
    "evaluate": "Evaluate a bundle on an MVTec-layout test set (AU-PRO, AUROC, plots).",
    "demo": "Train and evaluate on the built-in demo dataset (no download).",
    "export": "Export a bundle to ONNX (fp32/fp16/int8) and TensorRT engines.",
    "bench": "GFLOP, latency and throughput of a bundle or configuration.",
    "run": "Run the camera runtime on a bundle.",
    "service": "Install or print the systemd service.",
    "users": "Accounts for the operator page (viewer / lead).",
    "synth-defects": "Write pseudo-defective images with exact masks from good images (MVTec layout).",
    "thresholds": "Show or change a bundle's thresholds (recorded, graphs updated, no retraining).",
    "sign": "Sign a bundle (Ed25519) for devices that run with --trusted-key.",
    "keygen": "Make an Ed25519 key pair for sign / run --trusted-key.",
}

EXIT_USER = 2
EXIT_INTERNAL = 1
DEBUG_ENV = "EDGESTAD_DEBUG"


def one_line(text: str) -> str:
    """``text`` on one line: its non-empty lines joined with '; '."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _usage_line(exc: click.UsageError) -> str:
    ctx = exc.ctx
    see = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    if isinstance(exc, click.NoSuchOption):
        hint = f" (did you mean {', '.join(exc.possibilities)}?)" if exc.possibilities else ""
        return f"{exc.option_name}: no such option{hint}{see}"
    if isinstance(exc, click.MissingParameter):
        param = exc.param
        name = exc.param_hint or (param.get_error_hint(ctx) if param is not None and ctx is not None else "")
        return f"{str(name).replace(chr(39), '')}: missing (required){see}"
    if isinstance(exc, click.BadParameter):
        name = exc.param_hint
        if isinstance(name, (list, tuple)):
            name = " / ".join(name)
        if name is None and exc.param is not None and ctx is not None:
            name = exc.param.get_error_hint(ctx)
        if name:
            return f"{str(name).replace(chr(39), '')}: {exc.message}{see}"
    return f"{exc.format_message()}{see}"


def _is_user_error(exc: BaseException) -> bool:
    """Errors edgestad raises on purpose (its own exception types, whose messages name the file
    or option), undecodable text and OS errors about a named file."""
    if isinstance(exc, UnicodeDecodeError):
        return True
    if isinstance(exc, OSError) and getattr(exc, "filename", None) and isinstance(
            exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    return any(cls.__module__.split(".")[0] == "edgestad" and issubclass(cls, Exception)
               for cls in type(exc).__mro__)


def error_line(exc: BaseException) -> tuple[str, int]:
    """(the one-line message without 'error: ', exit code) of an exception."""
    if isinstance(exc, click.UsageError):
        return one_line(_usage_line(exc)), EXIT_USER
    if isinstance(exc, click.ClickException):
        code = exc.exit_code if exc.exit_code not in (0, 1) else EXIT_USER
        return one_line(exc.format_message()), code
    if isinstance(exc, UnicodeDecodeError):
        return one_line(f"input is not UTF-8 text ({exc})"), EXIT_USER
    if isinstance(exc, OSError) and getattr(exc, "filename", None):
        return one_line(f"{exc.filename}: {exc.strerror or exc}"), EXIT_USER
    code = getattr(exc, "exit_code", None)
    if _is_user_error(exc):
        return one_line(str(exc) or type(exc).__name__), code if isinstance(code, int) and code > 1 else EXIT_USER
    return (one_line(f"{type(exc).__name__}: {exc} (unexpected; rerun with --debug or {DEBUG_ENV}=1 "
                     "for the traceback)"), EXIT_INTERNAL)


def _debug_requested(args) -> bool:
    if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
        return True
    for arg in args:
        if arg == "--debug":
            return True
        if not arg.startswith("-"):
            return False  # options after the sub-command belong to it
    return False


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


class OneLineErrors(click.Group):
    """A group whose every user error is one ``error: ...`` line (see the module docstring)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        debug = _debug_requested(args)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except SystemExit:
            raise
        except BrokenPipeError:  # `edgestad ... | head`: nothing left to tell
            sys.exit(EXIT_INTERNAL)
        except (click.Abort, KeyboardInterrupt, EOFError):
            click.echo("\nerror: interrupted", err=True)
            sys.exit(130)
        except _NO_ARGS_IS_HELP as exc:  # bare `edgestad`: the help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except BaseException as exc:  # noqa: BLE001 - every failure ends in one line
            if debug and not isinstance(exc, click.UsageError):
                raise
            message, code = error_line(exc)
            click.echo(f"error: {message}", err=True)
            sys.exit(code)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)



class LazyGroup(OneLineErrors):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            missing = getattr(exc, "name", None) or str(exc)
            extra = {"torch": "train", "onnx": "export", "tensorrt": "tensorrt"}.get(
                (missing or "").split(".")[0], None)
            hint = f" (pip install 'edgestad[{extra}]')" if extra else ""

            @click.command(name=name, help=HELP[name],
                           context_settings={"ignore_unknown_options": True})
            @click.argument("args", nargs=-1, type=click.UNPROCESSED)
            def unavailable(args):
                raise click.ClickException(f"'edgestad {name}' needs {missing}{hint}")
            return unavailable
        return getattr(module, attr)

    def format_commands(self, ctx, formatter):
        # Short help without importing every sub-command (and torch with them).
        with formatter.section("Commands"):
            formatter.write_dl([(name, HELP[name]) for name in COMMANDS])


@click.group(cls=LazyGroup)
@click.version_option(package_name="edgestad")
@click.option("--debug", is_flag=True, expose_value=False,
              help=f"Show tracebacks (also {DEBUG_ENV}=1); errors are otherwise one line.")
def main():
    """edgestad: Student-Teacher anomaly detection from training to the factory line."""


if __name__ == "__main__":
    main()
