"""The `edgestad` command. Each sub-command is imported only when it runs, so `edgestad run`
works on a device that has no torch and `edgestad --help` starts fast."""
from __future__ import annotations

import importlib

import click

# name → "module:attribute" of a click command
COMMANDS = {
    "pretrain-teacher": "edgestad.train.cli:pretrain_teacher",
    "train": "edgestad.train.cli:train",
    "methods": "edgestad.train.cli:methods",
    "evaluate": "edgestad.evaluate:evaluate_command",
    "demo": "edgestad.demo:demo_command",
    "export": "edgestad.export.cli:export",
    "bench": "edgestad.bench.cli:bench_command",
    "run": "edgestad.runtime.cli:run",
    "service": "edgestad.runtime.cli:service",
}

HELP = {
    "pretrain-teacher": "Pretrain a patch-descriptor teacher on natural images.",
    "train": "Train a model (--method, default stfpm) on good images; write a bundle.",
    "methods": "List the methods: what each is, its paper, its default backbone.",
    "evaluate": "Evaluate a bundle on an MVTec-layout test set (AU-PRO, AUROC, plots).",
    "demo": "Train and evaluate on the built-in demo dataset (no download).",
    "export": "Export a bundle to ONNX (fp32/fp16/int8) and TensorRT engines.",
    "bench": "GFLOP, latency and throughput of a bundle or configuration.",
    "run": "Run the camera runtime on a bundle.",
    "service": "Install or print the systemd service.",
}


class LazyGroup(click.Group):
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
def main():
    """edgestad: Student-Teacher anomaly detection from training to the factory line."""


if __name__ == "__main__":
    main()
