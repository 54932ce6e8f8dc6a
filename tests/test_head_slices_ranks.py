"""The output layer in slices on two ranks whose chunks hold different numbers of masked positions.

Under ZeRO-3 every call of the head module gathers its weight, a collective: both ranks must call it
as often (dsdpo.objective.logprobs.position_slices), or the run hangs or pairs the wrong collectives.
"""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from dsdpo.evaluation.sampler import generate
from dsdpo.models.loading import load_model
from dsdpo.objective.draws import sample_draws
from dsdpo.objective.elbo import elbo_terms
from tests.ds_helpers import MASK, pair_batch
from tests.run_helpers import DEEPSPEED, REPO, _environment, free_port

INDICES = [[0, 1, 3], [2]]  # rank 0 scores three pairs, rank 1 one
PROMPTS = [[[10, 11, 12], [20, 21]], [[30]]]
SAMPLER = dict(mask_token_id=MASK, gen_length=8, block_length=4, steps=4)
SCRIPT = """
import json, sys
import dsdpo.evaluation.sampler
from dsdpo.runtime.dist import rank
from dsdpo.objective.draws import sample_draws
from dsdpo.models.loading import load_tokenizer
from dsdpo.objective.scoring import engine_terms
from dsdpo.config import ModelConfig
from dsdpo.runtime.ds_config import resolve_ds_config
from dsdpo.runtime.engine import build_engines, finish_distributed, init_distributed
from tests.ds_helpers import MASK, cpu_ds_config, micro_step, pair_batch
from tests.test_head_slices_ranks import INDICES, PROMPTS, SAMPLER

model_dir, out = sys.argv[-2:]  # after the launcher's --local_rank
tokenizer = load_tokenizer(model_dir)
ds_config = resolve_ds_config(cpu_ds_config(), world_size=2, total_steps=10)  # before the group starts
init_distributed()
engines = build_engines(ModelConfig(path=model_dir), ds_config)
for engine in (engines.policy, engines.reference):
    engine.module.head_slice_bytes = 4 * tokenizer.vocab_size * 2  # two positions a slice
dsdpo.evaluation.sampler.positions_per_slice = lambda vocab: 2
indices = INDICES[rank()]
batch, keys = pair_batch(tokenizer, indices)
draws = sample_draws(len(keys), batch.response_lengths, 4, "l_over_L", keys=keys)
terms, _ = engine_terms(engines.reference, batch, draws, mask_token_id=MASK, max_tokens=1 << 20)
loss = micro_step(engines, tokenizer, indices)[0].metrics["loss"]
engines.policy.step()
answers = dsdpo.evaluation.sampler.generate(engines.reference.module.model, PROMPTS[rank()], **SAMPLER)
with open(f"{out}/{rank()}.json", "w") as file:
    json.dump({"terms": terms.tolist(), "loss": loss, "answers": answers.tolist()}, file)
finish_distributed()
"""


def _launch_two_ranks(script, *args, timeout=300) -> str:
    """`deepspeed --num_gpus 2 SCRIPT ARGS`; its output. A hang (mismatched collectives) fails the test
    and the ranks are killed with the launcher (their own process group)."""
    port = free_port()
    command = [DEEPSPEED, "--num_gpus", "2", "--master_port", port, script, *args]
    process = subprocess.Popen(
        [str(part) for part in command], env=_environment(None), cwd=REPO, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"two ranks still running after {timeout} s: a collective that only one rank ran")
    assert process.returncode == 0, output[-3000:]
    # DeepSpeed's CPU all-reduce files (66 MB a rank) are unlinked once every rank has mapped them.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return output


def test_two_ranks_with_different_numbers_of_slices_score_and_sample_as_one(
    tiny_gemma_dir, tokenizer, tmp_path
):
    (tmp_path / "script.py").write_text(SCRIPT)
    _launch_two_ranks(tmp_path / "script.py", tiny_gemma_dir, tmp_path)
    model = load_model(tiny_gemma_dir).eval()
    for rank, indices in enumerate(INDICES):
        out = json.loads((tmp_path / f"{rank}.json").read_text())
        batch, keys = pair_batch(tokenizer, indices)
        draws = sample_draws(len(keys), batch.response_lengths, 4, "l_over_L", keys=keys)
        with torch.no_grad():
            terms = elbo_terms(
                model, batch.input_ids, batch.response_mask, mask_token_id=MASK, draws=draws,
                attention_mask=batch.attention_mask,
            )  # fmt: skip
            answers = generate(model, PROMPTS[rank], **SAMPLER)
        assert torch.allclose(torch.tensor(out["terms"]), terms.float(), atol=1e-5)
        assert out["answers"] == answers.tolist()
        assert out["loss"] > 0
