"""A step's small host values (token ids, positions, slots, rows) onto the device without waiting for it.

`torch.tensor(values, device="cuda")` and `.to("cuda")` from ordinary host memory copy synchronously: the call
returns only once the device has finished everything queued before the copy. A worker that builds step N+1's layout
while step N still runs (decode ahead) would then wait for step N at its first copy, and the device would idle
through the rest of N+1's host work. From page-locked memory the copy is queued like a kernel and the host goes on;
PyTorch's caching host allocator keeps the page-locked block until the copy has run, and reuses it after.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device(values: torch.Tensor | np.ndarray | Sequence, dtype: torch.dtype | None, device: torch.device | str):
    """`values` as a tensor of `dtype` on `device`; on a GPU through page-locked memory, queued, not waited for."""
    device = torch.device(device)
    host = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
