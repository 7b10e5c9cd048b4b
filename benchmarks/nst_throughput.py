"""Style-transfer throughput: a plain per-image fp32 loop (the PyTorch tutorial's) against ``stda generate``'s engine.

    .venv/bin/python benchmarks/nst_throughput.py                      # CPU: 4 pairs, 128 px, 40 evaluations
    .venv/bin/python benchmarks/nst_throughput.py --device cuda --pairs 64 --batch 32 --size 224 --iterations 100

Both optimise the same objective (:func:`stda_hf.nst.objective`: content, Gram and TV losses on the same VGG
layers and weights) for the same phantom pairs (benign content, malignant style), at the same size and for the
same number of loss evaluations. The plain loop is the PyTorch neural-style tutorial's: one image at a time, a
``nn.Sequential`` with loss modules, ``torch.optim.LBFGS`` and a closure that clamps the image, in fp32. The
engine is :func:`stda_hf.nst.stylize` with batches of ``--batch`` pairs, Gram targets computed once per style,
and ``--precision``. The two kinds of run alternate batch by batch, so load from other jobs hits both alike.

Printed: images/s of both (the engine's including its Gram targets) and their ratio; the mean final loss of
both (re-evaluated in fp32 on the final, clamped images, by the same function); and the engine's efficiency:
the time that ``--iterations`` bare forward+backward passes take at the same batch and precision, divided by
the time :func:`~stda_hf.nst.stylize` takes for the same batch.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("STDA_NO_PROGRESS", "1")

import torch
import torch.nn.functional as F
from torch import nn

from stda_hf.generate import load_content
from stda_hf.models.features import build_vgg_features
from stda_hf.nst import NSTConfig, objective, resolve_precision, style_targets, stylize


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=4, help="content/style pairs (default: 4)")
    p.add_argument("--batch", type=int, default=4, help="engine batch (default: 4)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default: 128)")
    p.add_argument("--iterations", type=int, default=40, help="loss evaluations per image (default: 40)")
    p.add_argument("--precision", default="bf16", help="engine precision: fp32, bf16 or auto (default: bf16)")
    p.add_argument("--preset", default="default", help="engine preset (default: default)")
    p.add_argument("--weights", default="random", help="imagenet, a file, or random (default: random)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument(
        "--repeats", type=int, default=1, help="time the engine and bare passes N times, keep the fastest"
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time (with --threads 1 on a CPU shared with other jobs)",
    )
    p.add_argument("--skip-plain", action="store_true", help="engine only (GPU throughput runs)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# The PyTorch tutorial's loop (https://pytorch.org/tutorials/advanced/neural_style_tutorial.html), on our layers


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    a, b, c, d = x.size()
    features = x.view(a * b, c * d)
    return torch.mm(features, features.t()).div(a * b * c * d)


class ContentLoss(nn.Module):
    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target = target.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.loss = F.mse_loss(x, self.target)
        return x


class StyleLoss(nn.Module):
    def __init__(self, target_feature: torch.Tensor, weight: float):
        super().__init__()
        self.target, self.weight = gram_matrix(target_feature).detach(), weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.loss = self.weight * F.mse_loss(gram_matrix(x), self.target)
        return x


class Normalization(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return (img - self.mean) / self.std


def tutorial_model(features, cfg: NSTConfig, style: torch.Tensor, content: torch.Tensor):
    """The tutorial's ``get_style_model_and_losses``: the VGG layers with loss modules after the used layers."""
    model = nn.Sequential(Normalization(features.mean, features.std))
    content_losses, style_losses = [], []
    weights = cfg.style_layer_weights()
    names = features.taps
    for i, layer in enumerate(features.features):
        model.add_module(f"layer_{i}", nn.ReLU(inplace=False) if isinstance(layer, nn.ReLU) else layer)
        name = names.get(i)
        if name == cfg.content_layer:
            loss = ContentLoss(model(content))
            model.add_module(f"content_{name}", loss)
            content_losses.append(loss)
        if name in weights:
            loss = StyleLoss(model(style), weights[name])
            model.add_module(f"style_{name}", loss)
            style_losses.append(loss)
    return model, style_losses, content_losses


def run_tutorial(features, cfg: NSTConfig, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """``run_style_transfer`` of the tutorial for one pair, for exactly ``cfg.iterations`` evaluations."""
    model, style_losses, content_losses = tutorial_model(features, cfg, style, content)
    input_img = content.clone()
    input_img.requires_grad_(True)
    model.eval()
    model.requires_grad_(False)
    optimizer = torch.optim.LBFGS([input_img])
    run = [0]
    while run[0] < cfg.iterations:
        optimizer.param_groups[0]["max_iter"] = min(20, cfg.iterations - run[0])

        def closure():
            with torch.no_grad():
                input_img.clamp_(0, 1)
            optimizer.zero_grad()
            model(input_img)
            style_score = sum(sl.loss for sl in style_losses) * cfg.style_weight
            content_score = sum(cl.loss for cl in content_losses) * cfg.content_weight
            loss = style_score + content_score
            loss.backward()
            run[0] += 1
            return style_score + content_score

        optimizer.step(closure)
    with torch.no_grad():
        input_img.clamp_(0, 1)
    return input_img.detach()


# ----------------------------------------------------------------------------------------------------------------
# Measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn, device: torch.device, clock: str = "wall"):
    sync(device)
    start = CLOCK[clock]()
    out = fn()
    sync(device)
    return out, CLOCK[clock]() - start


def phantom_pairs(n: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` benign content and ``n`` malignant style phantoms as (n, 3, size, size) tensors."""
    from stda_hf.phantoms import PhantomConfig, make_phantoms
    from stda_hf.real import read_real_folder

    root = Path(tempfile.mkdtemp()) / "real"
    make_phantoms(root, PhantomConfig(n=4 * n + 8, size=size, seed=0))
    folder = read_real_folder(root)
    pick = {lab: [im for im in folder.labelled if im.label == lab][:n] for lab in ("benign", "malignant")}
    load = [[load_content(im.path, size) for im in pick[lab]] for lab in ("benign", "malignant")]
    return torch.stack(load[0]).to(device), torch.stack(load[1]).to(device)


def final_losses(features, cfg, content, images, targets) -> torch.Tensor:
    """The weighted total loss of final images, evaluated in fp32 by the engine's objective."""
    with torch.no_grad():
        target = features(content)[cfg.content_layer]
        return objective(features, images, target, targets, cfg, "fp32").total


def bare_passes(features, cfg, content, targets, precision: str) -> None:
    """``cfg.iterations`` forward+backward passes of the objective: the floor the engine's time is held to."""
    with torch.no_grad():
        target = features(content)[cfg.content_layer].float()
    x = content.clone().requires_grad_(True)
    for _ in range(cfg.iterations):
        torch.autograd.grad(objective(features, x, target, targets, cfg, precision).total.sum(), x)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = NSTConfig(preset=args.preset, iterations=args.iterations, precision=args.precision)
    precision = resolve_precision(cfg.precision, device)
    features = build_vgg_features(cfg.arch, cfg.layers(), cfg.pooling, args.weights).to(device)
    contents, styles = phantom_pairs(args.pairs, args.size, device)
    plain_s = engine_s = bare_s = optimise_s = 0.0
    plain_loss, engine_loss, redone = [], [], 0
    for start in range(0, args.pairs, args.batch):
        content, style = contents[start : start + args.batch], styles[start : start + args.batch]
        targets, t_targets = timed(
            lambda style=style: style_targets(features, style, cfg), device, args.clock
        )
        t_engine = t_bare = float("inf")
        for _ in range(args.repeats):  # the fastest of each: other jobs only ever add time
            result, t = timed(lambda c=content, t=targets: stylize(features, c, t, cfg), device, args.clock)
            t_engine = min(t_engine, t)
            t = timed(
                lambda c=content, t=targets: bare_passes(features, cfg, c, t, precision), device, args.clock
            )[1]
            t_bare = min(t_bare, t)
        engine_s += t_targets + t_engine
        engine_loss.append(final_losses(features, cfg, content, result.images, targets))
        redone += int(result.redone.sum())
        bare_s += t_bare
        optimise_s += t_engine
        if args.skip_plain:
            continue
        for i in range(len(content)):
            one = {k: v[i : i + 1] for k, v in targets.items()}
            pair = (content[i : i + 1], style[i : i + 1])
            image, t_plain = timed(lambda pair=pair: run_tutorial(features, cfg, *pair), device, args.clock)
            plain_s += t_plain
            plain_loss.append(final_losses(features, cfg, content[i : i + 1], image, one))
    report(args, device, precision, plain_s, engine_s, bare_s / optimise_s, plain_loss, engine_loss)
    if precision != "fp32":
        print(
            f"redone:     {redone} of {args.pairs} images redone in fp32 (NaN/inf or a rising loss in {precision})"
        )


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), ""
    )
    return f"{cpu or platform.processor()} CPU, {torch.get_num_threads()} threads, {os.cpu_count()} cores"


def report(args, device, precision, plain_s, engine_s, efficiency, plain_loss, engine_loss) -> None:
    n = args.pairs
    print(f"machine: {machine(device)}; torch {torch.__version__}; {args.clock} clock")
    print(
        f"{n} pairs, {args.size} px, {args.iterations} evaluations, preset {args.preset}, weights {args.weights}; "
        f"engine batch {args.batch}, {precision}"
    )
    engine_loss_mean = torch.cat(engine_loss).mean().item()
    print(f"engine:     {n / engine_s:8.3f} images/s   final loss {engine_loss_mean:.6g}")
    if plain_loss:
        plain_loss_mean = torch.cat(plain_loss).mean().item()
        print(f"plain loop: {n / plain_s:8.3f} images/s   final loss {plain_loss_mean:.6g}")
        print(f"ratio:      {plain_s / engine_s:8.2f}x images/s (engine / plain)")
        print(f"loss:       {engine_loss_mean / plain_loss_mean:8.3f} (engine / plain; <= 1 is no worse)")
    print(
        f"efficiency: {efficiency:8.3f} (bare forward+backward passes / the engine's optimisation, same batches)"
    )


if __name__ == "__main__":
    main()
