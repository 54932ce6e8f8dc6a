"""Cards the planner knows: memory, memory bandwidth, host link bandwidth and dense bf16 rate.

Vendor spec-sheet numbers (dense bf16 tensor rate with fp32 accumulation, no sparsity); the host
link is the PCIe generation's x16 rate times 0.8, what pinned copies reach in practice. The time
estimates multiply the bf16 rate by MATMUL_EFFICIENCY: an assumption, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsdpo.errors import DsdpoError

GB = 1e9
MATMUL_EFFICIENCY = 0.4  # fraction of the peak bf16 rate a ZeRO-3 offload step sustains (assumed)


@dataclass(frozen=True)
class Card:
    name: str
    memory_bytes: float
    memory_bandwidth: float  # bytes/s
    host_bandwidth: float  # bytes/s, one direction of PCIe
    bf16_flops: float  # dense, fp32 accumulate


CARDS = {
    card.name: card
    for card in (
        Card("rtx4080", 16 * 2**30, 716.8 * GB, 0.8 * 32 * GB, 97.5e12),
        Card("rtx4090", 24 * 2**30, 1008 * GB, 0.8 * 32 * GB, 165.2e12),
        Card("rtx3090", 24 * 2**30, 936 * GB, 0.8 * 32 * GB, 71e12),
        Card("a100-80gb", 80 * 2**30, 2039 * GB, 0.8 * 32 * GB, 312e12),
        Card("h100-sxm", 80 * 2**30, 3350 * GB, 0.8 * 64 * GB, 989e12),
    )
}


def card(name: str) -> Card:
    key = name.lower().replace(" ", "").replace("_", "-")
    if key not in CARDS:
        raise DsdpoError(f"unknown card {name!r}; known: {', '.join(CARDS)}")
    return CARDS[key]
