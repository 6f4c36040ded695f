"""`MemoryManager`: measure memory around a computation and free what can be freed, on CUDA and CPU."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil  # a dependency of accelerate
import torch


class MemoryManager:
    """Frees cached memory when usage crosses `cleanup_threshold` (a fraction of the device's capacity).

    Usage is the largest of: the system's RAM in use (CPU) and, per visible CUDA device, the memory in use on it
    (``1 - free / total`` from the driver, which includes other processes). Cleaning up runs Python's garbage
    collector and, with CUDA, returns PyTorch's cached blocks to the driver.
    """

    def __init__(self, cleanup_threshold: float = 0.8):
        if (
            isinstance(cleanup_threshold, bool)
            or not isinstance(cleanup_threshold, (int, float))
            or not 0 <= cleanup_threshold <= 1
        ):
            raise ValueError(f"cleanup_threshold must be a fraction between 0 and 1, got {cleanup_threshold!r}")
        self.cleanup_threshold = float(cleanup_threshold)
        self.cleanups = 0
        self.history: list[dict[str, Any]] = []

    # --- measuring ----------------------------------------------------------------------------------------------------
    @staticmethod
    def memory_usage() -> dict[str, Any]:
        """RAM of the system and of this process, and per CUDA device: in use, allocated and reserved by PyTorch."""
        ram = psutil.virtual_memory()
        usage: dict[str, Any] = {
            "cpu": {
                "total_bytes": ram.total,
                "used_fraction": 1 - ram.available / ram.total,
                "process_rss_bytes": psutil.Process().memory_info().rss,
            },
            "cuda": {},
        }
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(index)
                usage["cuda"][index] = {
                    "total_bytes": total,
                    "used_fraction": 1 - free / total,
                    "allocated_bytes": torch.cuda.memory_allocated(index),
                    "reserved_bytes": torch.cuda.memory_reserved(index),
                    "peak_allocated_bytes": torch.cuda.max_memory_allocated(index),
                }
        return usage

    def usage_fraction(self, usage: dict[str, Any] | None = None) -> float:
        """The fullest device's used fraction (CPU RAM or any CUDA device)."""
        usage = usage or self.memory_usage()
        return max([usage["cpu"]["used_fraction"], *(d["used_fraction"] for d in usage["cuda"].values())])

    # --- freeing ------------------------------------------------------------------------------------------------------
    def cleanup(self) -> dict[str, Any]:
        """Collect garbage and empty PyTorch's CUDA cache; returns what was collected and the CUDA bytes released."""
        collected = gc.collect()
        released = 0
        if torch.cuda.is_available():
            before = sum(torch.cuda.memory_reserved(i) for i in range(torch.cuda.device_count()))
            torch.cuda.empty_cache()
            released = before - sum(torch.cuda.memory_reserved(i) for i in range(torch.cuda.device_count()))
        self.cleanups += 1
        return {"objects_collected": collected, "cuda_bytes_released": released}

    def cleanup_if_needed(self) -> bool:
        """Clean up if usage is at or above the threshold; True if it did."""
        if self.usage_fraction() >= self.cleanup_threshold:
            self.cleanup()
            return True
        return False

    @contextmanager
    def managed_computation(self) -> Iterator[dict[str, Any]]:
        """Measure the block (time, process RSS, CUDA peak) and clean up after it, even if it raises.

        Yields a dict that is filled in on exit and also appended to `history`."""
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start_rss, start = psutil.Process().memory_info().rss, time.perf_counter()
        record: dict[str, Any] = {}
        try:
            yield record
        finally:
            record["seconds"] = time.perf_counter() - start
            record["rss_before_bytes"] = start_rss
            record["rss_after_bytes"] = psutil.Process().memory_info().rss
            if torch.cuda.is_available():
                record["cuda_peak_allocated_bytes"] = {
                    i: torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())
                }
            record["cleanup"] = self.cleanup()
            self.history.append(record)
