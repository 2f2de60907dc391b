"""Run a deploy module eagerly in PyTorch behind the step-function interface (reference and fallback path)."""

from __future__ import annotations

import numpy as np
import torch


class TorchStep:
    def __init__(self, module: torch.nn.Module):
        self.module = module.eval()

    def __call__(self, *arrays: np.ndarray):
        with torch.no_grad():
            out = self.module(*(a if torch.is_tensor(a) else torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))
        return tuple(o.numpy() for o in out) if isinstance(out, (tuple, list)) else out.numpy()
