"""docs/options.md, written from the `dsdpo` commands themselves: every command's and subcommand's
options (name, default, help) as click holds them, so an option is documented once, where it is
defined (dsdpo/cli/, and the settings dataclasses its training options are built from).

    python -m dsdpo.cli.options_doc            # rewrites docs/options.md
"""

from __future__ import annotations

import inspect
from pathlib import Path

import click

from dsdpo.cli import main

OUTPUT = Path(__file__).resolve().parents[2] / "docs/options.md"
HEADER = """# Options of every `dsdpo` command

Generated from the commands' own definitions by `python -m dsdpo.cli.options_doc`; do not edit by
hand (tests/test_options_doc.py fails when this file is stale). `deepspeed launch/train.py` takes the
options of `dsdpo train`. The guides in docs/ explain what the options are for.
"""


def commands(group: click.Group, path: str):
    """(path, command) for the group and everything under it, in `--help`'s order."""
    yield path, group
    for name in group.list_commands(click.Context(group)):
        command = group.commands[name]
        if isinstance(command, click.Group):
            yield from commands(command, f"{path} {name}")
        else:
            yield f"{path} {name}", command


def cell(text: str) -> str:
    """Text that stays inside one cell of a markdown table."""
    return " ".join(text.split()).replace("|", "\\|")


def default_of(param: click.Parameter) -> str:
    """The default as click applies it; blank where none is set (the training options built from the
    settings dataclasses say theirs in their help, as `dsdpo train --help` does)."""
    default = param.default
    if default is None or default == () or not isinstance(default, (str, int, float, bool, tuple, list)):
        return ""
    if isinstance(param, click.Option) and param.is_flag and default is False:
        return ""
    return f"`{default}`"


def command_section(path: str, command: click.Command) -> str:
    ctx = click.Context(command, info_name=path)
    help_text = "\n".join(line for line in inspect.cleandoc(command.help or "").splitlines() if line != "\b")
    lines = [f"## `{path}`", "", "    " + " ".join([path, *command.collect_usage_pieces(ctx)]), ""]
    if help_text:
        lines += [help_text, ""]
    rows = []
    for param in command.params:
        record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
        if isinstance(param, click.Option) and (record is None or param.hidden):
            continue
        if isinstance(param, click.Argument):
            name, help_ = param.make_metavar(ctx), "(argument)"
        else:
            name, help_ = record[0], param.help or ""
        rows.append(f"| `{cell(name)}` | {default_of(param)} | {cell(help_)} |")
    if rows:
        lines += ["| option | default | help |", "|---|---|---|", *rows, ""]
    return "\n".join(lines)


def render() -> str:
    sections = [command_section(path, command) for path, command in commands(main, "dsdpo")]
    return HEADER + "\n" + "\n".join(sections)


if __name__ == "__main__":
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
