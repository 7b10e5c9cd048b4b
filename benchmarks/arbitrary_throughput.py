"""Throughput of the arbitrary-style engine: onnxruntime vs a one-time conversion of its graphs to torch.

::

    OMP_NUM_THREADS=1 python benchmarks/arbitrary_throughput.py              # CPU, 1 and 2 threads, 224 px
    python benchmarks/arbitrary_throughput.py --device cuda --threads 4 --batches 1 32

Prints images/s (style vectors computed once per style, as ``stda generate`` does; timed: the transformer
with resizing, colour and strength handling as :func:`stda_hf.generate.arbitrary.stylize` runs them), the largest and
mean pixel difference of the torch conversion against onnxruntime, and the hours the paper's 248,489 images
would take at each rate. The torch conversion evaluates the ONNX graph op by op (weights dequantised once,
activation QuantizeLinear/DequantizeLinear kept as fake quantisation): it is what
``stda_hf.generate.arbitrary`` would use if it were faster and matched onnxruntime to 1e-4. Inputs are random images
(the speed does not depend on content); the figures come from one machine and say so.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from stda_hf.generate import arbitrary

PAPER_IMAGES = 248_489


class TorchGraph(torch.nn.Module):
    """An ONNX graph of the ops the two Magenta models use, evaluated node by node in torch."""

    def __init__(self, data: bytes, device: torch.device):
        super().__init__()
        import onnx
        from onnx import numpy_helper

        model = onnx.load_from_string(data)
        env = {
            t.name: torch.from_numpy(numpy_helper.to_array(t).copy()).to(device)
            for t in model.graph.initializer
        }
        nodes = [
            (
                n.op_type,
                list(n.input),
                list(n.output),
                {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute},
            )
            for n in model.graph.node
        ]
        self.inputs = [i.name for i in model.graph.input]
        self.outputs = [o.name for o in model.graph.output]
        self.nodes = []
        for node in nodes:  # fold what depends on constants only (weight dequantisation)
            if all(i in env or not i for i in node[1]):
                env.update(zip(node[2], _op(node, env), strict=True))
            else:
                self.nodes.append(node)
        self.constants = env

    @torch.no_grad()
    def forward(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        env = dict(self.constants)
        env.update(zip(self.inputs, inputs, strict=True))
        for node in self.nodes:
            env.update(zip(node[2], _op(node, env), strict=True))
        return [env[o] for o in self.outputs]


def _op(node: tuple, env: dict) -> list[torch.Tensor]:
    op, names, _, a = node
    x = [env[n] if n else None for n in names]
    if op == "DequantizeLinear":
        q, scale, zero = x[0], x[1], x[2]
        shape = [1] * q.dim()
        if scale.numel() > 1:
            shape[a.get("axis", 1)] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
        return [(q.to(torch.int32) - zero.to(torch.int32)).float() * scale]
    if op == "QuantizeLinear":
        low, high = (-128, 127) if x[2].dtype == torch.int8 else (0, 255)
        return [(torch.round(x[0] / x[1]) + x[2].float()).clamp(low, high).to(x[2].dtype)]
    if op == "Conv":
        p = a.get("pads", [0, 0, 0, 0])
        inp = F.pad(x[0], (p[1], p[3], p[0], p[2])) if any(p) else x[0]
        return [F.conv2d(inp, x[1], x[2], a.get("strides", 1), 0, a.get("dilations", 1), a.get("group", 1))]
    if op == "Pad":
        p, n = [int(v) for v in x[1]], x[0].dim()
        if p[1] == p[n + 1] == 0:  # NCHW
            return [F.pad(x[0], (p[3], p[n + 3], p[2], p[n + 2]), mode="reflect")]
        nchw = F.pad(x[0].permute(0, 3, 1, 2), (p[2], p[n + 2], p[1], p[n + 1]), mode="reflect")
        return [nchw.permute(0, 2, 3, 1)]
    if op == "Reshape":
        shape = [x[0].shape[i] if d == 0 else int(d) for i, d in enumerate(x[1].tolist())]
        return [x[0].reshape(shape)]
    if op == "Resize":
        scales = [float(s) for s in x[2]][2:]
        return [x[0] if scales == [1.0, 1.0] else F.interpolate(x[0], scale_factor=scales, mode="nearest")]
    if op == "Clip":
        return [x[0].clamp(float(x[1]), float(x[2]))]
    unary = {
        "Transpose": lambda t: t.permute(*a["perm"]),
        "GlobalAveragePool": lambda t: t.mean((2, 3), keepdim=True),
        "Relu": torch.relu,
        "Sqrt": torch.sqrt,
        "Reciprocal": torch.reciprocal,
        "Sigmoid": torch.sigmoid,
    }
    binary = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul}
    if op in unary:
        return [unary[op](x[0])]
    if op in binary:
        return [binary[op](x[0], x[1])]
    raise NotImplementedError(op)


class TorchSession:
    """The ``run`` interface of an onnxruntime session over a :class:`TorchGraph`, so ``stylize`` uses either."""

    def __init__(self, name: str, device: torch.device):
        self.graph = TorchGraph(arbitrary.free_shapes(arbitrary.model_bytes(name)), device)
        self.device = device

    def run(self, _outputs, feed: dict) -> list[np.ndarray]:
        inputs = [torch.from_numpy(feed[n]).to(self.device) for n in self.graph.inputs]
        return [o.cpu().numpy() for o in self.graph(*inputs)]

    def get_inputs(self):
        return [argparse.Namespace(name=n) for n in self.graph.inputs]

    def get_outputs(self):
        return [argparse.Namespace(name=n) for n in self.graph.outputs]


def torch_models(onnx_models: arbitrary.ArbitraryModels, device: torch.device) -> arbitrary.ArbitraryModels:
    """The same engine with both sessions replaced by their torch conversion."""
    return arbitrary.ArbitraryModels(
        TorchSession("predict", device),
        TorchSession("transform", device),
        onnx_models.digests,
        f"torch:{device}",
        onnx_models.version,
    )


def rate(models, content, vectors, cfg, seconds: float, device: torch.device) -> float:
    """Images per second of :func:`arbitrary.stylize` on ``content``, over at least ``seconds``."""
    arbitrary.stylize(models, content, vectors, cfg)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        arbitrary.stylize(models, content, vectors, cfg)
        done += len(content)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--size", type=int, default=224, help="output side in pixels (default: 224)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU threads (default: 1 2)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    parser.add_argument(
        "--render-sizes", type=int, nargs="+", default=[256, 0], help="working sides, 0: own (default: 256 0)"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement (default: 3)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    print(f"arbitrary engine, {args.size} px output, {args.device}; random inputs; one machine, shared cores")
    print(f"{'backend':<22}{'threads':>8}{'batch':>6}{'render':>7}{'img/s':>8}{'h/248,489':>11}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        onnx_models = arbitrary.load_models(device, threads=threads)
        backends = {
            onnx_models.provider: onnx_models,
            f"torch ({device.type})": torch_models(onnx_models, device),
        }
        for batch in args.batches:
            content = torch.rand(batch, 3, args.size, args.size, generator=gen).to(device)
            vectors = arbitrary.style_vectors(
                onnx_models, torch.rand(batch, 3, 256, 256, generator=gen), arbitrary.ArbitraryConfig()
            )
            for render in args.render_sizes:
                cfg = arbitrary.ArbitraryConfig(render_size=render)
                for name, models in backends.items():
                    r = rate(models, content, vectors, cfg, args.seconds, device)
                    print(
                        f"{name:<22}{threads:>8}{batch:>6}{render or args.size:>7}{r:>8.1f}{PAPER_IMAGES / r / 3600:>11.2f}"
                    )
    cfg = arbitrary.ArbitraryConfig()
    content = torch.rand(4, 3, args.size, args.size, generator=gen).to(device)
    vectors = arbitrary.style_vectors(onnx_models, torch.rand(4, 3, 256, 256, generator=gen), cfg)
    ours = arbitrary.stylize(onnx_models, content, vectors, cfg).images
    theirs = arbitrary.stylize(backends[f"torch ({device.type})"], content, vectors, cfg).images
    diff = (ours - theirs).abs()
    print(
        f"torch conversion vs onnxruntime ({onnx_models.provider}), 4 images: max |diff| {diff.max():.4f}, "
        f"mean {diff.mean():.5f}, share of values off by > 1e-4: {(diff > 1e-4).float().mean():.1%} "
        "(the graphs requantise activations 195 times; a one-ulp difference becomes a quantisation step)"
    )
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


if __name__ == "__main__":
    main()
