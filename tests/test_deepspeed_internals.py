"""The DeepSpeed internals dsdpo relies on (dsdpo/runtime/zero.py) exist on a real engine: a DeepSpeed
release that renames one fails here, not silently in a run."""

import pytest

from dsdpo.errors import DsdpoError
from dsdpo.runtime.zero import INTERNALS, internal, missing_internals
from tests.ds_helpers import cpu_ds_config, engines_for


def test_every_internal_dsdpo_reads_exists_and_a_renamed_one_stops_the_run(tiny_gemma_dir):
    optimizer = engines_for(tiny_gemma_dir, cpu_ds_config()).policy.optimizer
    assert missing_internals(optimizer) == []
    assert internal(optimizer, "swap_optimizer") is False  # CPU offload swaps nothing to NVMe
    with pytest.raises(DsdpoError, match=r"DeepSpeed \d+\.\d+.*has no 'renamed_buckets'.*DeepSpeed 0\.19"):
        internal(optimizer, "_renamed_buckets")
    assert len(set(INTERNALS)) == len(INTERNALS)
