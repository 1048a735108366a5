"""`edgestad methods` and the methods section of `edgestad train --help`: generated from the
methods' declarations (name, paper, defaults, settings, typed options, presets), torch-free."""
from __future__ import annotations

import dataclasses
import textwrap

import click

from . import DEFAULT_METHOD, list_methods
from .base import Method


WIDTH = 100


def _value(value) -> str:
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, tuple) else str(value)


def setting_defaults(method: Method) -> str:
    fields = dataclasses.fields(method.config_cls)
    return ", ".join(f"{f.name}={_value(f.default)}" for f in fields)


def describe(method: Method, settings: bool = True) -> list[str]:
    """A method's lines: the summary, its training defaults, settings, options and presets."""
    default = " (default)" if method.name == DEFAULT_METHOD else ""
    lines = [f"{method.name}{default}: {method.summary()}"]
    if method.defaults:
        lines.append("  defaults: " + ", ".join(
            f"{k.replace('_', ' ')} {method.epochs_rule() if k == 'epochs' else v}"
            for k, v in method.defaults.items()))
    if settings:
        lines.append(textwrap.fill(f"settings (-o NAME=VALUE, or their own flags): "
                                   f"{setting_defaults(method)}", WIDTH, initial_indent="  ",
                                   subsequent_indent="    "))
    if method.options:
        lines.append("  options:")
        lines.extend(textwrap.fill(option.describe(), WIDTH, initial_indent="    ",
                                   subsequent_indent="      ") for option in method.options)
    for name, values in method.presets.items():
        lines.append(f"  preset {name} (--preset {name}): "
                     + ", ".join(f"{k}={_value(v)}" for k, v in values.items()))
    return lines


def methods_text(settings: bool = True) -> str:
    return "\n".join(line for m in list_methods() for line in describe(m, settings))


@click.command("methods")
def methods_command():
    """List the methods `edgestad train --method` accepts: what each is, its paper, its backbone,
    its training defaults, settings (with their defaults), options and presets."""
    click.echo(methods_text())
