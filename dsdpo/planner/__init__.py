"""Will it fit, and how fast: memory and time of a run planned from config.json alone.

shapes.py        the model's shape and parameter counts, from its config on the meta device
activations.py   bytes one forward saves for backward, or keeps without gradients (formulas)
zero_settings.py the DeepSpeed config's ZeRO-3 settings that size those allocations
model_states.py  what ZeRO-3 allocates on each device, item by item (formulas; beside them
                 DeepSpeed's own estimator, dsdpo/runtime/estimate.py)
memory.py        bytes per device (GPU peak, CPU RAM, NVMe) for a run: model states plus activations
sweeps.py        parameter sweeps per optimizer step
cards.py         the card table: memory, memory bandwidth, PCIe bandwidth, bf16 rate
report.py        time per pair and the printed plan (`dsdpo plan`)
search.py        --ram-gib: the ways to run a job compared, the fastest that fits
chunking.py      --max-tokens-per-forward auto: the largest chunks that fit the free device memory
measure.py       the activation bytes a forward and backward really hold, measured (checks the formulas)
monitor.py       memory and swap traffic of a running process, for metrics.jsonl
"""
