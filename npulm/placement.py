"""Where each matmul weight runs: CPU or an NPU pipeline, chosen per tensor at load.

Rules, in order (the first that matches wins):
  1. per-tensor overrides: glob pattern on the GGUF name -> "cpu" or a pipeline name (e.g. "blk.*.ffn_down.*=cpu")
  2. --npu-layers N, like llama.cpp's -ngl: the last N blocks go to the NPU; N > n_layer also places the output
     matmul; "all" means every block and the output
  3. everything else: CPU
An NPU spec is "npu:<PIPELINE>", or "npu:auto" to let the NPU backend pick the pipeline from the GGUF type.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from .linear import Weight

_BLOCK = re.compile(r"^blk\.(\d+)\.")


def parse_overrides(items: list[str] | None) -> list[tuple[str, str]]:
    """['pattern=target', ...] (commas also separate) -> [(pattern, target)]."""
    out = []
    for item in items or []:
        for part in item.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ValueError(f"tensor override {part!r} must look like PATTERN=cpu or PATTERN=<pipeline>")
            pattern, target = (s.strip() for s in part.split("=", 1))
            out.append((pattern, target))
    return out


@dataclass
class Placement:
    n_layer: int = 0
    npu_layers: int | str = 0  # int or "all"
    pipeline: str | None = None  # None = by GGUF type
    overrides: list[tuple[str, str]] = field(default_factory=list)

    def _npu(self, target: str | None) -> str:
        return "npu:" + (target or "auto")

    def spec_for(self, weight: Weight) -> str:
        for pattern, target in self.overrides:
            if fnmatch.fnmatchcase(weight.name, pattern):
                if target.lower().startswith("npu:"):  # a full spec (e.g. from `-ngl auto`: "npu:W16A16@64")
                    return target
                return target.lower() if target.lower().startswith("cpu") else self._npu(target)
        n = self.n_layer + 1 if self.npu_layers == "all" else int(self.npu_layers)
        if n <= 0:
            return "cpu"
        m = _BLOCK.match(weight.name)
        if m:
            return self._npu(self.pipeline) if int(m.group(1)) >= self.n_layer - n else "cpu"
        return self._npu(self.pipeline) if n > self.n_layer else "cpu"  # the output matmul
