"""One set of sampler options (issue 19): generate, eval accuracy and make-pairs offer the same ones
with the same help and defaults, training the same with --eval-; one chat rule, recorded in every
output; defaults from the model's family; `dsdpo --help` without torch."""

import json
import re
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dsdpo.cli import main
from dsdpo.config import SamplerConfig
from tests.cli_helpers import run
from tests.run_helpers import REPO

SAMPLER_FLAGS = ["--gen-length", "--block-length", "--steps", "--temperature", "--remasking", "--chat"]
COMMANDS = {"generate": ["generate"], "eval accuracy": ["eval", "accuracy"], "make-pairs": ["make-pairs"]}
HARNESS = ["eval", "harness"]  # its chat rule: tests/test_harness.py
FAST = ["--gen-length", "4", "--block-length", "2", "--steps", "4"]
QUESTIONS = [{"question": "2+3?", "answer": 5}, {"question": "Half of 8?", "answer": 4}]


def _help(*command: str) -> str:
    result = CliRunner().invoke(main, [*command, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def _option_blocks(help_text: str) -> dict[str, str]:
    """Each option's lines in a --help text (its flags, metavar, help and default), by first flag."""
    blocks, current = {}, None
    for line in help_text.splitlines():
        found = re.match(r"  (?:-\w, )?(--[\w-]+)", line)
        if found:
            current = found.group(1)
            blocks[current] = []
        if current and line.strip():
            blocks[current].append(line.strip())
    return {flag: " ".join(lines) for flag, lines in blocks.items()}


def test_generate_eval_accuracy_and_make_pairs_show_the_same_sampler_options():
    commands = {**COMMANDS, "eval harness": HARNESS}
    blocks = {name: _option_blocks(_help(*command)) for name, command in commands.items()}
    for flag in SAMPLER_FLAGS:
        shown = {name: command_blocks.get(flag) for name, command_blocks in blocks.items()}
        assert None not in shown.values(), (flag, shown)
        assert len(set(shown.values())) == 1, (flag, shown)
    assert "--chat / --no-chat" in blocks["generate"]["--chat"]
    assert "default 0.0" in blocks["generate"]["--temperature"]
    assert "default low_confidence" in blocks["generate"]["--remasking"]


def test_training_shows_the_same_options_prefixed_with_eval():
    commands = _option_blocks(_help("generate"))
    training = _option_blocks(_help("train"))
    for flag in SAMPLER_FLAGS:
        prefixed = flag.replace("--", "--eval-", 1)
        expected = commands[flag].replace("--no-chat", "--no-eval-chat").replace(flag, prefixed, 1)
        assert " ".join(training[prefixed].split()) == " ".join(expected.split()), flag


@pytest.mark.parametrize(
    ("family", "published", "expected"),
    [
        ((256, 8), {}, (256, 8, 256)),  # LLaDA's GSM8K setting
        ((256, 256), {}, (256, 256, 256)),  # Dream: one block
        ((None, 4), {}, (128, 4, 128)),  # SDAR: its block, dsdpo's length
        ((None, None), {}, (128, 32, 128)),  # no published setting
        ((256, 8), {"gen_length": 64}, (64, 8, 64)),  # the options win, the rest follows them
        ((None, None), {"gen_length": 16}, (16, 16, 16)),  # a block never longer than the answer
        ((256, 8), {"steps": 128}, (256, 8, 128)),
    ],
)
def test_unset_fields_come_from_the_family_then_dsdpos_defaults(family, published, expected):
    gen, block = family
    settings = SamplerConfig(**published).resolved(gen_length=gen, block_length=block, chat_template=True)
    assert (settings.gen_length, settings.block_length, settings.steps) == expected


def test_a_model_gets_its_familys_published_schedule(tokenizer):
    """LLaDA's OpenCompass GSM8K setting, Dream's eval script's (one block), SDAR's block of 4, and
    dsdpo's defaults for a model of no known family (dsdpo/families/__init__.py cites the sources)."""
    from dsdpo.evaluation.sampler import sampler_for
    from dsdpo.families import DREAM, LLADA, SDAR
    from dsdpo.models.loading import load_config

    tiny = load_config(tokenizer.name_or_path)
    expected = {
        LLADA.name: (256, 8, 256),
        DREAM.name: (256, 256, 256),
        SDAR.name: (128, 4, 128),
        "": (128, 32, 128),
    }
    for family in (LLADA, DREAM, SDAR, None):
        config = family.config_class() if family else tiny
        settings = sampler_for(SamplerConfig(), config, tokenizer)
        assert (settings.gen_length, settings.block_length, settings.steps) == expected[
            family.name if family else ""
        ]


@pytest.fixture(scope="module")
def plain_tokenizer_dir(tiny_gemma_dir, tmp_path_factory):
    """The tiny model with a tokenizer that has no chat template."""
    folder = tmp_path_factory.mktemp("no-chat-template") / "model"
    shutil.copytree(tiny_gemma_dir, folder)
    (folder / "chat_template.jinja").unlink()
    assert "chat_template" not in (folder / "tokenizer_config.json").read_text()
    return folder


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("problems") / "problems.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in QUESTIONS))
    return path


def _chat_used(command: str, model, problems_file, out_dir, *extra) -> bool:
    """The chat setting `command` used on `model`: as it printed it, and as its output file records it
    (make-pairs: rows would hold {role, content} prompts; a random tiny model answers no problem right,
    so it makes no pair here, and dsdpo.evaluation.on_policy's tests cover the rows)."""
    out = out_dir / f"{command.replace(' ', '-')}.jsonl"
    report = out_dir / "report.json"
    args = {
        "generate": ["generate", "--model", model, "--data", problems_file, "--out", out],
        "eval accuracy": [
            "eval", "accuracy", "--model", model, "--data", problems_file, "--out", out, "--json", report,
            "--no-progress",
        ],
        "make-pairs": [
            "make-pairs", "--source", "model", "--model", model, "--problems", problems_file, "--out", out,
            "--samples", "2", "--temperature", "1.0", "--num", "1",
        ],
    }[command]  # fmt: skip
    result = run(*args, *FAST, *extra)
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if line.startswith("sampler: ")]
    assert len(said) == 1, result.output
    chat = said[0].endswith("prompts as user turns of the chat template")
    assert chat or said[0].endswith("plain prompts (no chat template)"), said
    if command != "make-pairs":
        assert {json.loads(line)["chat"] for line in out.read_text().splitlines()} == {chat}
    if command == "eval accuracy":
        assert json.loads(report.read_text())["sampler"]["chat"] is chat
    return chat


@pytest.mark.parametrize("command", list(COMMANDS))
def test_one_chat_rule_in_every_command(
    command, tiny_gemma_dir, plain_tokenizer_dir, problems_file, tmp_path
):
    """The chat template when the tokenizer has one, --no-chat overrides, none without a template."""
    assert _chat_used(command, tiny_gemma_dir, problems_file, tmp_path) is True
    assert _chat_used(command, tiny_gemma_dir, problems_file, tmp_path, "--no-chat") is False
    assert _chat_used(command, plain_tokenizer_dir, problems_file, tmp_path) is False
    assert _chat_used(command, plain_tokenizer_dir, problems_file, tmp_path, "--chat") is False


def test_help_imports_no_torch():
    """`dsdpo --help` and every command's --help build their options from light modules."""
    commands = [
        [],
        *COMMANDS.values(),
        HARNESS,
        ["train"],
        ["score"],
        ["plan"],
        ["export"],
        ["eval", "preference"],
    ]
    script = "\n".join([
        "import sys",
        "from dsdpo.cli import main",
        f"for args in {commands!r}:",
        "    try:",
        "        main([*args, '--help'])",
        "    except SystemExit as end:",
        "        assert end.code == 0",
        "heavy = ('torch', 'transformers', 'deepspeed')",
        "print(sorted(name for name in heavy if name in sys.modules), file=sys.stderr)",
    ])  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "[]", result.stderr
