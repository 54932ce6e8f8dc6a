"""Click options built from the settings dataclasses of dsdpo.config: a setting's name, help, default
and choices are written once, in its field, and every command that offers it reads them from there."""

from __future__ import annotations

import dataclasses
import typing

import click

TYPES = {int: click.INT, float: click.FLOAT, str: click.STRING}


def schema_option(
    section: str, spec: dataclasses.Field, hint, default, *, prefix: str = "", name: str | None = None
) -> click.Option:
    """The option of one config field: --PREFIXfield-name (or its metadata's flag), its help and
    choices; the parameter is `section__field` (or `name`). A bool is a flag that sets the other
    value than its default, or, with no default (None: decided later), a --x/--no-x pair. A union such
    as `int | str` is taken as text that dsdpo.config converts (naming the field when it cannot). Not
    given: None, which leaves the config file's value alone."""
    meta = spec.metadata
    kinds = [k for k in (typing.get_args(hint) or (hint,)) if k is not type(None)]
    dashed = prefix + spec.name.replace("_", "-")
    name = name or f"{section}__{spec.name}"
    help_text = meta.get("help", "")
    if kinds == [bool] and default is None:
        return click.Option([f"--{dashed}/--no-{dashed}", name], default=None, help=help_text)
    if kinds == [bool]:
        flag = meta.get("flag") or (f"--no-{dashed}" if default else f"--{dashed}")
        return click.Option([flag, name], is_flag=True, flag_value=not default, default=None, help=help_text)
    choices = meta.get("choices")
    kind = click.Choice(choices) if choices else TYPES[kinds[0]] if len(kinds) == 1 else click.STRING
    shown = "" if default in (None, "") else f" (default {default})"
    return click.Option(
        [meta.get("flag") or f"--{dashed}", name], type=kind, default=None, help=help_text + shown
    )


def section_options(
    cls: type, section: str, *, prefix: str = "", names: str = "section"
) -> list[click.Option]:
    """The options of every field of one settings dataclass; `names`: "section" gives parameters
    `section__field`, "field" the field names themselves."""
    hints, defaults = typing.get_type_hints(cls), cls()
    return [
        schema_option(
            section,
            spec,
            hints[spec.name],
            getattr(defaults, spec.name),
            prefix=prefix,
            name=spec.name if names == "field" else None,
        )
        for spec in dataclasses.fields(cls)
    ]
