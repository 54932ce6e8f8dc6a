"""Helpers of the CLI tests: run a dsdpo command in-process, check a one-line error."""

from click.testing import CliRunner

from dsdpo.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def assert_one_line_error(result, message):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert message in lines[0], result.output
