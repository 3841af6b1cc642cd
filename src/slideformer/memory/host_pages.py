"""Large, long-lived host buffers on transparent huge pages (``engine.host_pages``).

Every step the CPU AdamW streams ~28 bytes per host-updated parameter (FP32 master and moments read and
written, the BF16 gradient in and the BF16 upload copy out) through host memory, beside the transfers' DMA.
Where that bus bounds the step (batch 8 on a 24 GiB card), the cost of each TLB miss on those streams counts:
with 4 KiB pages every 4 KiB of each stream needs a translation, and under virtualisation (the H100 box is a
VM) each miss is a two-dimensional page walk. 2 MiB pages need 512 times fewer.

torch's own switch (the ``THP_MEM_ALLOC_ENABLE`` environment variable) is process-global and read once, so the
engine maps its buffers itself: an anonymous private mapping, a 2 MiB-aligned range of it advised
``MADV_HUGEPAGE``, wrapped by ``torch.frombuffer`` (which keeps the mapping alive as long as any view of it).
The kernel backs the range with huge pages where its policy allows (``/sys/kernel/mm/transparent_hugepage``:
'always' or 'madvise') and with 4 KiB pages otherwise; either way the buffer is ordinary pageable memory that
``cudaHostRegister`` can page-lock in place.

Invariant: a buffer from ``huge_empty`` is a contiguous CPU tensor of exactly the asked size whose data starts on
a 2 MiB boundary; its contents start at zero (anonymous memory), and it is freed when its last view is.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch

HUGE_PAGE = 2 * 2**20
"""The x86-64 / arm64 (4 KiB base pages) transparent huge page size."""

THP_SYSFS = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode(path: Path = THP_SYSFS) -> str:
    """The kernel's transparent huge page policy: 'always', 'madvise', 'never', or 'unavailable' (no such
    file: not Linux, or a kernel without THP)."""
    try:
        text = path.read_text()
    except OSError:
        return "unavailable"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else "unavailable"


def huge_pages_available() -> bool:
    """Whether an advised mapping can get huge pages here (the policy is 'always' or 'madvise')."""
    return thp_mode() in ("always", "madvise") and hasattr(mmap, "MADV_HUGEPAGE")


def huge_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor of ``numel`` elements of ``dtype`` on a 2 MiB-aligned range advised for huge pages."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(0, dtype=dtype)
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE  # whole huge pages, so the last one can be huge too
    mapping = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # holds ``mapping`` for as long as a view lives
    offset = -raw.data_ptr() % HUGE_PAGE  # a multiple of the base page: the mapping starts page-aligned
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE, offset, size)
    return raw[offset:offset + nbytes].view(dtype)


def anon_huge_bytes() -> int:
    """Bytes of this process's anonymous memory backed by transparent huge pages (0 where unknown)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
