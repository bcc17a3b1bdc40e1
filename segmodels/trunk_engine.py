"""What runs the trunk: PyTorch, or the same BatchNorm-folded trunk exported to ONNX and run by ONNX Runtime.

The trunk is most of an image's cost (every pyramid level, every zoom crop); on a CPU, ONNX Runtime runs this
MobileNetV2 trunk about twice as fast as PyTorch's eager kernels (``bench/bench_pipeline.py --trunk-engine``).
Both engines take ``(B, 3, H, W) float32`` (normalised as :func:`segmodels.data.to_tensor` makes it) and
return the trunk's taps ``{name: (B, C, H / stride, W / stride) float32}``; their outputs agree to float32
rounding (tests/test_trunk_engine.py states the tolerance).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import torch
from torch import nn

TrunkEngine = Callable[[torch.Tensor], dict[str, torch.Tensor]]
ENGINES = ("torch", "onnxruntime", "auto")


class TorchTrunk:
    """The trunk run by PyTorch, its input switched to channels-last (what the folded convolutions are fastest
    on)."""

    name = "torch"

    def __init__(self, trunk: nn.Module) -> None:
        self.trunk = trunk

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.trunk(images.contiguous(memory_format=torch.channels_last))


class _TapTuple(nn.Module):
    """The trunk with its tap dict flattened to a tuple of ``(B, H', W', C)`` arrays (ONNX graphs return
    positional outputs; channels-last is what the PyTorch heads after the trunk run fastest on)."""

    def __init__(self, trunk: nn.Module, taps: list[str]) -> None:
        super().__init__()
        self.trunk, self.taps = trunk, taps

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.trunk(images)
        return tuple(out[tap].permute(0, 2, 3, 1) for tap in self.taps)


class OnnxRuntimeTrunk:
    """The trunk exported to ONNX (in memory, from the weights the predictor holds, so it can never disagree
    with the checkpoint) and run by ONNX Runtime's CPU provider with ``threads`` intra-op threads
    (default: PyTorch's, which the worker sizes to its share of the cores). Any input size: height and width
    are dynamic axes."""

    name = "onnxruntime"

    def __init__(self, trunk: nn.Module, threads: int | None = None) -> None:
        import onnxruntime

        probe = torch.zeros(1, 3, 64, 64)
        with torch.no_grad():
            self.taps = list(trunk(probe))
        graph = io.BytesIO()
        dynamic = {"images": {0: "batch", 2: "height", 3: "width"}}
        dynamic.update({tap: {0: "batch", 1: f"{tap}_h", 2: f"{tap}_w"} for tap in self.taps})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, once per load
            torch.onnx.export(
                _TapTuple(trunk, self.taps).eval(),
                (probe,),
                graph,  # type: ignore[arg-type]  # stub says a path; the TorchScript exporter takes a file object
                input_names=["images"],
                output_names=self.taps,
                dynamic_axes=dynamic,
                opset_version=17,
                dynamo=False,
            )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Idle intra-op threads sleep instead of spinning: spinning ones take the cores from the PyTorch heads
        # that run right after the trunk (1.3-2x slower clicks on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(
            graph.getvalue(), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        outputs = self.session.run(self.taps, {"images": x})
        # (B, H', W', C) arrays viewed as channels-last (B, C, H', W') tensors, without a copy.
        return {
            tap: torch.from_numpy(out).permute(0, 3, 1, 2)
            for tap, out in zip(self.taps, outputs, strict=True)
        }


def build_trunk_engine(
    trunk: nn.Module, engine: str, device: torch.device, threads: int | None = None
) -> TrunkEngine:
    """The engine named ``engine`` (one of :data:`ENGINES`) for ``trunk`` on ``device``. ``auto``: ONNX
    Runtime on a CPU, PyTorch on anything else; ``onnxruntime`` runs on the CPU only, with ``threads``
    intra-op threads (default: PyTorch's)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown trunk engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine == "onnxruntime" and device.type != "cpu":
        raise ValueError(f"the onnxruntime trunk engine runs on the CPU, not on {device}")
    if engine == "torch" or device.type != "cpu":
        return TorchTrunk(trunk)
    return OnnxRuntimeTrunk(trunk, threads)
