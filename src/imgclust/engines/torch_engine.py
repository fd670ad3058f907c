"""PyTorch eager engine: always available, the reference every other engine is checked against.

CPU: channels_last (1.6x faster convolutions on EfficientNet-Lite0 at 224 px, 24 vs 15 img/s)
and bf16 autocast on request. CUDA: channels_last, bf16/fp16 autocast and ``torch.compile``
(first batch compiles; any compile failure falls back to eager with one warning).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from imgclust.backbones.base import Backbone
from imgclust.engines.base import Engine

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, backbone: Backbone, precision: str = "fp32", device: torch.device | str = "cpu",
                 compile: bool | None = None) -> None:
        self.device = torch.device(device)
        self.precision = self.effective_precision = precision
        self.pre = backbone.preprocess
        self.model = backbone.to(self.device).eval().to(memory_format=torch.channels_last)
        self.dtype = _DTYPES.get(precision)
        self._compiled = None
        if compile is None:
            compile = self.device.type == "cuda"
        if compile:
            try:
                self._compiled = torch.compile(self.model)
            except Exception as e:  # noqa: BLE001 - no compiler on this platform
                warnings.warn(f"torch.compile unavailable ({type(e).__name__}); running eager", stacklevel=2)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled is not None:
            try:
                return self._compiled(x)
            except Exception as e:  # noqa: BLE001 - e.g. no C compiler for inductor
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); running eager", stacklevel=2)
                self._compiled = None
        return self.model(x)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = self.pre.to_tensor(batch).to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype or torch.bfloat16,
                                                    enabled=self.dtype is not None):
            return self._forward(x).float().cpu().numpy()
