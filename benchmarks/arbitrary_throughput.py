"""Throughput of the arbitrary-style engine: onnxruntime vs a one-time conversion of its graphs to torch; and
the quality gate's cost next to it, engine alone vs ``stda generate`` end to end.

::

    OMP_NUM_THREADS=1 python benchmarks/arbitrary_throughput.py              # CPU, 1 and 2 threads, 224 px
    python benchmarks/arbitrary_throughput.py --device cuda --threads 4 --batches 1 32
    python benchmarks/arbitrary_throughput.py --gate --threads 2 --images 128  # gate / engine, end to end / engine

``--gate`` measures, in one run and on the same machine, per image at ``--size`` with ``--threads`` threads and
batches of 16 (``stda generate``'s default): the engine alone (style vectors computed once, as the stage does),
the quality gate alone on its outputs (the style images' Gram matrices cached, as the stage does), and
``stda generate --engine arbitrary`` on ``--images`` phantom pairs as a user runs it (a subprocess: loading
images, engine, gate, JPEG files, manifest). It prints wall-clock and CPU seconds per image and the ratios
gate / engine and end-to-end / engine-alone rate; the end-to-end rate is given both for the stage's loop
(``generate_summary.json``) and for the whole command with its start-up. Ratios are what compare across
machines; absolute figures depend on the machine and its load.

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


def _clock(fn, repeats: int) -> tuple[float, float]:
    """Best wall-clock and CPU seconds of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    wall = cpu = float("inf")
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    return wall, cpu


def gate_and_end_to_end(size: int, threads: int, images: int, repeats: int = 3) -> None:
    """Print the gate's cost next to the engine's, and ``stda generate``'s end-to-end rate (see the module doc)."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from stda_hf.data.phantoms import PhantomConfig, make_phantoms
    from stda_hf.data.split import SplitConfig, make_splits
    from stda_hf.generate.engines import as_saved
    from stda_hf.generate.quality import StyleDistance, assess

    torch.set_num_threads(threads)
    batch, gen = 16, torch.Generator().manual_seed(0)
    models, cfg = arbitrary.load_models("cpu", threads=threads), arbitrary.ArbitraryConfig()
    content = torch.rand(batch, 3, size, size, generator=gen)
    styles = torch.rand(batch, 3, size, size, generator=gen)
    masks = torch.zeros(batch, size, size, dtype=torch.bool)
    masks[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = True
    vectors = arbitrary.style_vectors(models, styles, cfg)
    results = as_saved(arbitrary.stylize(models, content, vectors, cfg).images)
    scorer = StyleDistance()
    grams = scorer.grams(styles)
    engine = _clock(lambda: arbitrary.stylize(models, content, vectors, cfg), repeats)
    gate = _clock(lambda: assess(content, grams, results, scorer, mask=masks), repeats)
    with tempfile.TemporaryDirectory() as tmp:
        real, out = Path(tmp) / "real", Path(tmp) / "syn"
        make_phantoms(real, PhantomConfig(n=max(64, images // 2 + 16), size=size, seed=0))
        make_splits(real, SplitConfig(seed=0))
        cmd = [sys.executable, "-m", "stda_hf.cli", "generate", str(real), "--out", str(out)]
        cmd += ["--engine", "arbitrary", "--size", str(size), "--limit", str(images), "--batch", str(batch)]
        cmd += ["--max-failed-share", "1"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "STDA_NO_PROGRESS": "1"}
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        whole = time.perf_counter() - start
        summary = json.loads((out / "generate_summary.json").read_text())
    engine_after = _clock(lambda: arbitrary.stylize(models, content, vectors, cfg), repeats)
    engine_wall = (engine[0] + engine_after[0]) / 2 / batch  # before and after the command: the same load
    engine_cpu = (engine[1] + engine_after[1]) / 2 / batch
    loop_rate, whole_rate = summary["done"] / summary["seconds"], summary["done"] / whole
    print(f"quality gate vs arbitrary engine, {size} px, {threads} threads, batches of {batch}, CPU")
    print(f"{'':<34}{'wall s/img':>11}{'CPU s/img':>11}{'share of engine (wall, CPU)':>30}")
    print(f"{'engine alone':<34}{engine_wall:>11.4f}{engine_cpu:>11.4f}")
    print(
        f"{'gate alone (' + scorer.name + ')':<34}{gate[0] / batch:>11.4f}{gate[1] / batch:>11.4f}"
        f"{gate[0] / batch / engine_wall:>18.0%}, {gate[1] / batch / engine_cpu:.0%}"
    )
    print(
        f"stda generate --engine arbitrary --size {size}, {summary['done']} images: {loop_rate:.2f} images/s in "
        f"the stage's loop, {whole_rate:.2f} images/s for the whole command ({whole:.1f} s with start-up); "
        f"engine alone {1 / engine_wall:.2f} images/s; end to end / engine alone: {loop_rate * engine_wall:.0%} "
        f"(loop), {whole_rate * engine_wall:.0%} (whole command)"
    )
    print(
        f"verdicts: {summary['run_verdicts']}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )


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
    parser.add_argument(
        "--gate", action="store_true", help="measure the quality gate and stda generate end to end instead"
    )
    parser.add_argument(
        "--images", type=int, default=128, help="--gate: images stda generate makes (default: 128)"
    )
    args = parser.parse_args(argv)
    if args.gate:
        gate_and_end_to_end(args.size, args.threads[-1], args.images)
        return
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
