"""docs/options.md is what dsdpo.cli.options_doc writes from the commands as they are now."""

import click

from dsdpo.cli import main
from dsdpo.cli.options_doc import OUTPUT, render


def test_docs_options_md_is_up_to_date():
    assert OUTPUT.read_text() == render(), "docs/options.md is stale: run `python -m dsdpo.cli.options_doc`"


def test_every_visible_option_of_every_command_is_documented():
    sections = {part.split("`", 1)[0]: part for part in render().split("\n## `")[1:]}

    def walk(command, path):
        assert path in sections, path
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert f"| `{param.opts[0]}" in sections[path], (path, param.opts[0])
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(main, "dsdpo")
