from __future__ import annotations

import torch

from node.resources import probe_resources


def test_ram_is_read_and_vram_only_on_a_cuda_device():
    cpu = probe_resources()
    assert cpu.device == "cpu" and (cpu.vram_total_bytes, cpu.vram_free_bytes) == (0, 0)
    assert 0 < cpu.ram_free_bytes <= cpu.ram_total_bytes
    asked = probe_resources(cuda=True)
    if torch.cuda.is_available():
        assert asked.device == "cuda" and 0 < asked.vram_free_bytes <= asked.vram_total_bytes
    else:  # CI and the dev box: no GPU, so a --device cuda node still reports what it has
        assert asked.device == "cpu" and asked.vram_total_bytes == 0
