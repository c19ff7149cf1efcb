"""Weights the loader fills are advised onto 2 MiB pages (Linux THP), with their contents unchanged."""

import re
import sys

import pytest
import torch

from gptoss import load_model
from gptoss.ops.pages import HUGE_PAGE, huge_pages_enabled, use_huge_pages
from gptoss.quant.int8 import Int8Linear

needs_thp = pytest.mark.skipif(
    sys.platform != "linux" or not huge_pages_enabled(),
    reason="transparent huge pages are off on this system (use_huge_pages does nothing there)",
)


def advised_bytes(t: torch.Tensor) -> int:
    """Bytes of t's storage in memory maps that carry MADV_HUGEPAGE ("hg" in their VmFlags in
    /proc/self/smaps); a map may reach beyond the storage, as Linux merges neighbouring maps advised
    alike. Whether Linux then finds free 2 MiB pages for them depends on the machine's memory and on
    whether the allocator handed out fresh memory (written memory keeps its 4 KiB pages), so the
    tests check the advice, which is ours; the benchmark reports how much of a loaded model actually
    landed on huge pages."""
    start = t.untyped_storage().data_ptr()
    end = start + t.untyped_storage().nbytes()
    total, overlap = 0, 0
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if span := re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line):
                overlap = max(0, min(end, int(span[2], 16)) - max(start, int(span[1], 16)))
            elif overlap and line.startswith("VmFlags:") and "hg" in line.split()[1:]:
                total += overlap
    return total


@needs_thp
def test_a_fresh_tensor_gets_huge_pages_and_keeps_its_contents():
    t = torch.empty(5 * HUGE_PAGE + 12345, dtype=torch.uint8)
    advised = use_huge_pages([t, t[10:]])  # a view of the same storage is advised once
    assert 4 * HUGE_PAGE <= advised <= 5 * HUGE_PAGE
    assert advised_bytes(t) >= advised
    t.copy_(torch.arange(t.numel()) % 251)
    assert torch.equal(t, torch.arange(t.numel()) % 251)


def test_written_memory_keeps_its_contents():
    t = torch.randn(3 * HUGE_PAGE // 4)
    before = t.clone()
    use_huge_pages([t])
    assert torch.equal(t, before)


def test_small_tensors_are_left_alone():
    assert use_huge_pages([torch.empty(HUGE_PAGE // 2, dtype=torch.uint8), torch.zeros(3)]) == 0


@needs_thp
def test_the_loader_and_int8_quantization_put_weights_on_huge_pages():
    model = load_model("gptoss-nano")  # its embedding is 6 MiB of bf16
    assert advised_bytes(model.model.embed_tokens.weight) >= HUGE_PAGE
    layer = Int8Linear(torch.nn.Linear(2048, 3000))  # 6 MB of int8
    assert advised_bytes(layer.weight) >= HUGE_PAGE
