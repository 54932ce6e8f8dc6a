"""A checkpoint whose shards carry pickled code is refused by every command that reads it, before
any of that code runs; --trust-checkpoint loads it."""

import json
import shutil

import pytest
import torch

from dsdpo.errors import DsdpoError
from dsdpo.models.loading import load_config, load_tokenizer
from dsdpo.runtime.checkpoint import STATE_FILE, TrainState, file_digests, load_checkpoint, save_checkpoint
from dsdpo.runtime.dist import barrier
from dsdpo.runtime.safe_load import check_checkpoint_pickles
from dsdpo.training.demo import addition_pairs, write_jsonl
from tests.cli_helpers import assert_one_line_error, run
from tests.ds_helpers import cpu_ds_config, engines_for, micro_step
from tests.run_helpers import run_train, tail, train_args

MODEL_SHARD = "zero_pp_rank_0_mp_rank_00_model_states.pt"


class CreatesFile:
    """Unpickling this object calls open(path, "w"): the file appearing means the pickle ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def trained(tiny_gemma_dir, tokenizer, tmp_path_factory):
    """A policy engine after one optimizer step and its (clean) checkpoint folder."""
    engines = engines_for(tiny_gemma_dir, cpu_ds_config())
    micro_step(engines, tokenizer, [0, 1])
    engines.policy.step()
    output = tmp_path_factory.mktemp("run")
    hf_config, hf_tokenizer = load_config(tiny_gemma_dir), load_tokenizer(tiny_gemma_dir)
    save_checkpoint(
        engines.policy,
        output,
        TrainState(step=1, batcher={"epoch": 0, "position": 1}),  # what a resumed run reads
        config={},
        world_size=1,
        is_rank0=True,
        save_hf_files=lambda f: (hf_config.save_pretrained(f), hf_tokenizer.save_pretrained(f)),
        keep_last=2,
        barrier=barrier,
    )
    return engines, output / "step_000001"


@pytest.fixture
def poisoned(trained, tmp_path):
    """A copy of the checkpoint whose model shard also holds a CreatesFile; and the file's path."""
    _, clean = trained
    folder = tmp_path / "run" / clean.name
    shutil.copytree(clean, folder)
    shard = torch.load(folder / MODEL_SHARD, weights_only=False)
    marker = tmp_path / "code_ran"
    shard["payload"] = CreatesFile(marker)
    torch.save(shard, folder / MODEL_SHARD)
    meta = json.loads((folder / STATE_FILE).read_text())  # an attacker rewrites the digests too
    meta["digests"] = file_digests(folder)
    (folder / STATE_FILE).write_text(json.dumps(meta))
    return folder, marker


def test_deepspeed_checkpoints_and_their_universal_conversion_pass(trained, tmp_path):
    _, clean = trained
    check_checkpoint_pickles(clean, trusted=False)
    result = run("convert-checkpoint", clean, tmp_path / "universal")
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "universal" / "zero").rglob("*.pt"))  # per-parameter files, in subfolders
    check_checkpoint_pickles(tmp_path / "universal", trusted=False)


@pytest.mark.parametrize(
    "command",
    [
        ["export", "{ckpt}", "{tmp}/out"],
        ["convert-checkpoint", "{ckpt}", "{tmp}/universal"],
        ["score", "--model", "{ckpt}", "--data", "{data}", "--out", "{tmp}/s.jsonl", "--no-progress"],
        ["eval", "preference", "--model", "{ckpt}", "--data", "{data}", "--no-progress"],
        ["generate", "--model", "{ckpt}", "--prompt", "1+1=", "--gen-length", "4", "--steps", "4",
         "--block-length", "4"],
    ],
    ids=lambda command: command[0] if command[0] != "eval" else "eval-preference",
)  # fmt: skip
def test_every_command_refuses_a_checkpoint_carrying_code(poisoned, tmp_path, command):
    folder, marker = poisoned
    data = write_jsonl(addition_pairs(2), tmp_path / "pairs.jsonl")
    args = [arg.format(ckpt=folder, tmp=tmp_path, data=data) for arg in command]
    result = run(*args)
    assert_one_line_error(result, f"{folder / MODEL_SHARD}: refused")
    assert "(it calls io.open)" in result.output and "--trust-checkpoint" in result.output
    assert "weights_only" not in result.output  # not PyTorch's advice to load it unchecked
    assert not marker.exists()


def test_trust_checkpoint_loads_it(poisoned, tmp_path):
    folder, marker = poisoned
    result = run("export", folder, tmp_path / "out", "--trust-checkpoint")
    assert result.exit_code == 0, result.output
    assert marker.exists()  # the payload was live: the refusal above is what kept it from running


def test_resume_refuses_it_and_loads_it_when_trusted(trained, poisoned):
    engines, _ = trained
    folder, marker = poisoned
    with pytest.raises(DsdpoError, match=r"refused.*--trust-checkpoint"):
        load_checkpoint(engines.policy, folder, world_size=1)
    assert not marker.exists()
    state, _ = load_checkpoint(engines.policy, folder, world_size=1, trust_checkpoint=True)
    assert state.step == 1 and marker.exists()


def test_launch_train_resume_refuses_it_unless_trusted(tiny_gemma_dir, poisoned, tmp_path):
    folder, marker = poisoned
    (tmp_path / "ds.json").write_text(json.dumps(cpu_ds_config()))  # the checkpoint's optimizer
    data = write_jsonl(addition_pairs(4), tmp_path / "pairs.jsonl")
    args = [
        *train_args(tmp_path / "ds.json", tiny_gemma_dir, data, tmp_path / "out", max_steps=1),
        "--resume",
        folder,
    ]
    refused = run_train(args)
    assert refused.returncode == 2, tail(refused)
    assert f"error: {folder / MODEL_SHARD}: refused" in refused.stderr and not marker.exists()
    trusted = run_train([*args, "--trust-checkpoint"])  # step 1 of --max-steps 1: loads, then stops
    assert trusted.returncode == 0, tail(trusted)
    assert f"resumed from {folder} at step 1" in trusted.stdout + trusted.stderr and marker.exists()


def test_random_bytes_in_a_shard_header_are_corruption_not_code(trained, tmp_path):
    """Issue 20: garbage in the pickle was reported as "pickled objects that could run code" with an
    empty reason."""
    _, clean = trained
    shard = tmp_path / MODEL_SHARD
    data = bytearray((clean / MODEL_SHARD).read_bytes())
    start = data.index(b"data.pkl") + 40  # inside the pickle, past its zip entry header
    data[start : start + 40] = bytes(range(200, 240))
    shard.write_bytes(bytes(data))
    with pytest.raises(DsdpoError) as refused:
        check_checkpoint_pickles(tmp_path, trusted=False)
    assert str(refused.value).startswith(f"{shard}: not a readable checkpoint shard (corrupt: ")
    assert "weights_only" not in str(refused.value)
