"""What a running step uses: accelerator and CPU memory (current and peak) and the bytes the process
read from and wrote to its drives since the last sample (NVMe swapping, when the DeepSpeed config
offloads to "nvme"), for metrics.jsonl and the progress bar.

Measured, not planned: torch.cuda's allocator counters on a GPU; the process's resident set (psutil)
and its peak (getrusage); the kernel's per-process block I/O counters (/proc/self/io read_bytes and
write_bytes), which count every drive access of the process: with NVMe offload that is the
parameter and optimizer swapping, plus a checkpoint when one is written in that step.
"""

from __future__ import annotations

import resource
import sys

import psutil
import torch

MB = 2**20


def offloads_to_nvme(ds_config: dict) -> bool:
    zero = ds_config.get("zero_optimization") or {}
    return any(
        (zero.get(block) or {}).get("device") == "nvme" for block in ("offload_param", "offload_optimizer")
    )


class ResourceMonitor:
    def __init__(self, ds_config: dict):
        self.process = psutil.Process()
        self.nvme = offloads_to_nvme(ds_config)
        self._io = self._io_counters()

    def _io_counters(self):
        try:
            counters = self.process.io_counters()
        except (AttributeError, psutil.Error):  # not on every platform
            return None
        return counters.read_bytes, counters.write_bytes

    def sample(self) -> dict[str, float]:
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        metrics = {
            "cpu_memory_mb": self.process.memory_info().rss / MB,
            "cpu_peak_memory_mb": peak_rss / MB if sys.platform == "darwin" else peak_rss / 1024,
        }
        if torch.cuda.is_available():
            metrics["gpu_memory_mb"] = torch.cuda.memory_allocated() / MB
            metrics["gpu_peak_memory_mb"] = torch.cuda.max_memory_allocated() / MB
        if self.nvme:
            now = self._io_counters()
            if now is not None and self._io is not None:
                metrics["nvme_read_mb"] = (now[0] - self._io[0]) / MB
                metrics["nvme_written_mb"] = (now[1] - self._io[1]) / MB
            self._io = now
        return metrics
