"""A two-layer CNN on side x side RGB inputs for the certify profiling benchmark (not a test).

conv 8 ch stride 2 -> ReLU -> conv 8 ch stride 2 -> ReLU -> linear 4, random weights (seed 0), two
uniform [0, 1] samples labelled by the model's own argmax (docs/benchmarks.md, issue 10 session 4):

    .venv/bin/python tools/make_cnn_bench.py 64 /tmp/big     # writes cnn64.onnx and cnn64.npz
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch


class _Net(torch.nn.Module):
    def __init__(self, side: int) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(8 * (side // 4) ** 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(x.flatten(1))


def main() -> None:
    side, out = int(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = _Net(side).eval()
    x = torch.rand(2, 3, side, side)
    torch.onnx.export(net, (x,), str(out / f"cnn{side}.onnx"), dynamo=False, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, opset_version=17)
    np.savez(out / f"cnn{side}.npz", x=x.numpy(), y=net(x).argmax(1).numpy())


if __name__ == "__main__":
    main()
