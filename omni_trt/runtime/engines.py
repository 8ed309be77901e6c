"""Engines: named tensors in, named tensors out. Stand-in modules call these in place of the
PyTorch components they replace."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

# numpy has no bf16: ORT bf16 graphs are not run here (ORT CPU cannot run bf16 MatMul anyway).
_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}


class OnnxRuntimeEngine:
    """ONNX Runtime over an exported graph: CPU here, CUDA where onnxruntime-gpu is installed."""

    def __init__(self, onnx_path: Path, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=providers)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self.path = Path(onnx_path)

    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise KeyError(f"{self.path.name}: missing inputs {sorted(missing)}")
        device = next(iter(feeds.values())).device
        np_feeds = {k: feeds[k].detach().cpu().contiguous().numpy() for k in self.input_names}
        outs = self.session.run(list(self.output_names), np_feeds)
        return {k: torch.from_numpy(v).to(device) for k, v in zip(self.output_names, outs)}
