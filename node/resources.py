"""What this machine has: device kind and memory, read when an advert is built."""

from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(frozen=True, slots=True)
class ResourceFigures:
    device: str
    vram_total_bytes: int
    vram_free_bytes: int
    ram_total_bytes: int
    ram_free_bytes: int


def probe_resources(cuda: bool = False) -> ResourceFigures:
    """RAM from psutil; VRAM only when the node runs a torch engine on CUDA (`--device cuda`): importing
    torch costs seconds, so other nodes never do."""
    vm = psutil.virtual_memory()
    vram_total = vram_free = 0
    device = "cpu"
    if cuda:
        import torch

        if torch.cuda.is_available():
            vram_free, vram_total = torch.cuda.mem_get_info()
            device = "cuda"
    return ResourceFigures(device, vram_total, vram_free, vm.total, vm.available)
