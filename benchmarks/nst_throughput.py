"""Style transfer per CPU core as time to quality: seconds until the plain fp32 loop's final loss is reached.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/nst_throughput.py --threads 1 --clock cpu --size 224 --pairs 1 \
        --iterations 100 --variants "engine fp32" coarse-to-fine "coarse-to-fine + bf16" \
        --plot docs/nst_time_to_quality.png
    .venv/bin/python benchmarks/nst_throughput.py --device cuda --pairs 32 --batch 32 --size 224 --iterations 100

The reference is the PyTorch neural-style tutorial's loop: one image at a time, a ``nn.Sequential`` with loss
modules, ``torch.optim.LBFGS`` and a closure that clamps the image, in fp32, for ``--iterations`` loss
evaluations. Its final loss (re-evaluated in fp32 by :func:`stda_hf.generate.nst.objective`) is each pair's target.
Every variant of the engine (:func:`stda_hf.generate.nst.stylize`, batches of ``--batch`` pairs, the same objective,
layers and weights) runs ``--engine-iterations`` evaluations (default 1.5x the plain loop's, so that its curve
can pass the target) while a callback keeps the image it holds after each evaluation and the clock (the callback's own time is not counted); afterwards each kept image is evaluated in
fp32 at full size by the same function (coarse-stage images upsampled as the engine does). A variant's time to
quality is the time, from computing its style targets, until every image of its batch is at or below its
target. Variants: the engine in fp32; with channels-last tensors; bf16 autocast with an fp32 finish;
coarse-to-fine (half size first); both; ``torch.compile`` of the network (compilation excluded, printed apart).
Both the tutorial and the engine compute content features and style Grams once per image, not per evaluation.

Printed per variant: seconds per image to the target and the speed-up over the plain loop, the evaluations that
took, the final loss after all its evaluations (ratio to the plain loop's), images/s of the whole run, and the
quality gate's verdicts (:mod:`stda_hf.generate.quality`) on the images at the target. ``--plot`` draws the curves.
``--engine arbitrary gatys`` also measures the pretrained feed-forward engine (:mod:`stda_hf.generate.arbitrary`) on the
same pairs, with the same clock and gate, and both engines' hours for the paper's 248,489 images.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("STDA_NO_PROGRESS", "1")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from stda_hf.generate.nst import NSTConfig, objective, resize, style_targets, stylize
from stda_hf.generate.quality import StyleDistance, assess
from stda_hf.generate.stage import GenerateConfig, load_content
from stda_hf.models.features import build_vgg_features
from stda_hf.models.weights import default_weights

VARIANTS = {
    "engine fp32": {"precision": "fp32", "coarse_to_fine": 0.0},
    "channels_last": {"precision": "fp32", "coarse_to_fine": 0.0, "channels_last": True},
    "bf16, fp32 finish": {"precision": "bf16", "coarse_to_fine": 0.0},
    "coarse-to-fine": {"precision": "fp32", "coarse_to_fine": 0.5},
    "coarse-to-fine + bf16": {"precision": "bf16", "coarse_to_fine": 0.5},
    "torch.compile": {"precision": "fp32", "coarse_to_fine": 0.0, "compile": True},
}
"""Engine settings of each variant (``compile``: the network wrapped in ``torch.compile``)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=2, help="content/style pairs (default: 2)")
    p.add_argument("--batch", type=int, default=2, help="engine batch (default: 2)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default: 128)")
    p.add_argument("--iterations", type=int, default=40, help="loss evaluations per image (default: 40)")
    p.add_argument(
        "--engine-iterations",
        type=int,
        default=0,
        help="evaluations of each engine variant, so its curve can pass the target (default: 1.5x --iterations)",
    )
    p.add_argument("--preset", default="default", help="engine preset (default: default)")
    p.add_argument(
        "--weights",
        default=default_weights(),
        help=f"vgg19-imagenet, imagenet, a file, or random (default: {default_weights()}, the engine's default)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="engine variants to run"
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time (with OMP_NUM_THREADS=1 on a CPU shared with other jobs)",
    )
    p.add_argument(
        "--skip-plain", action="store_true", help="engine images/s only, no target (GPU throughput)"
    )
    p.add_argument("--plot", type=Path, help="write the loss-vs-time curves to this PNG")
    p.add_argument(
        "--engine",
        nargs="+",
        choices=("gatys", "arbitrary"),
        default=["gatys"],
        help="engines to measure on the same pairs: gatys (the variants above), arbitrary (the pretrained "
        "feed-forward network, images/s and gate; needs the 'arbitrary' extra) (default: gatys)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        nargs="+",
        default=[0.0, 0.01],
        help="targets: the plain loop's final loss times (1 + each); the first sets the table and the plot "
        "(default: 0 0.01)",
    )
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
    """The tutorial's first module, in the input convention of the weights (Caffe's for vgg19-imagenet)."""

    def __init__(self, features):
        super().__init__()
        self.preprocess = features.preprocess

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.preprocess(img)


def tutorial_model(features, cfg: NSTConfig, style: torch.Tensor, content: torch.Tensor):
    """The tutorial's ``get_style_model_and_losses``: the VGG layers with loss modules after the used layers."""
    model = nn.Sequential(Normalization(features))
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


def run_tutorial(
    features, cfg: NSTConfig, content: torch.Tensor, style: torch.Tensor, callback=None
) -> torch.Tensor:
    """``run_style_transfer`` of the tutorial for one pair, for exactly ``cfg.iterations`` evaluations.

    ``callback(image)`` is called after every evaluation with the (clamped) image that was evaluated.
    """
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
            if callback is not None:
                callback(input_img.detach())
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


class Curve:
    """Images kept after every evaluation with the time they were reached (the keeping itself not counted)."""

    def __init__(self, device: torch.device, clock: str, offset: float = 0.0):
        self.device, self.clock, self.offset = device, CLOCK[clock], offset
        self.times: list[float] = []
        self.images: list[torch.Tensor] = []
        self.paused = 0.0
        self.start = None

    def begin(self) -> None:
        sync(self.device)
        self.start = self.clock()

    def elapsed(self) -> float:
        sync(self.device)
        return self.clock() - self.start - self.paused + self.offset

    def __call__(self, images: torch.Tensor) -> None:
        sync(self.device)
        now = self.clock()
        self.times.append(now - self.start - self.paused + self.offset)
        self.images.append(images.detach().clone())
        self.paused += self.clock() - now


def phantom_pairs(n: int, size: int, device: torch.device):
    """``n`` benign content and ``n`` malignant style phantoms (n, 3, size, size), and the contents' masks."""
    from stda_hf.data.phantoms import PhantomConfig, make_phantoms
    from stda_hf.data.real import read_real_folder

    root = Path(tempfile.mkdtemp()) / "real"
    make_phantoms(root, PhantomConfig(n=4 * n + 8, size=size, seed=0))
    folder = read_real_folder(root)
    pick = {lab: [im for im in folder.labelled if im.label == lab][:n] for lab in ("benign", "malignant")}
    load = [torch.stack([load_content(im.path, size) for im in pick[lab]]) for lab in ("benign", "malignant")]
    masks = [np.asarray(Image.open(im.mask_path).resize((size, size))) > 127 for im in pick["benign"]]
    return load[0].to(device), load[1].to(device), torch.from_numpy(np.stack(masks))


@torch.no_grad()
def fp32_losses(features, cfg, content, images, targets) -> torch.Tensor:
    """The weighted total loss of images (upsampled to the content's size), in fp32 by the engine's objective."""
    target = features(content)[cfg.content_layer]
    images = resize(images, tuple(content.shape[-2:]))
    return objective(features, images, target, targets, cfg, "fp32").total


@dataclass
class Run:
    """One variant over all pairs: per pair, the curve's times and fp32 losses, and the images at the target."""

    name: str
    times: list[np.ndarray] = dataclasses.field(default_factory=list)  # per batch: (evaluations,)
    losses: list[np.ndarray] = dataclasses.field(default_factory=list)  # per batch: (evaluations, B)
    total_s: float = 0.0  # the whole runs (all evaluations, targets included)
    images: list[torch.Tensor] = dataclasses.field(default_factory=list)  # per batch: at the target (or last)
    reached: list[float] = dataclasses.field(
        default_factory=list
    )  # per batch: seconds to the target (or inf)
    at: list[int] = dataclasses.field(default_factory=list)  # per batch: evaluations to the target
    final: list[np.ndarray] = dataclasses.field(default_factory=list)  # per batch: final fp32 losses (B,)
    extra: str = ""


def record(run: Run, curve: Curve, losses: np.ndarray, goal: np.ndarray | None) -> None:
    """Add one batch's curve to ``run``: its time to ``goal`` (per-image targets), the images there."""
    run.times.append(np.asarray(curve.times))
    run.losses.append(losses)
    run.final.append(losses[-1])
    hit = np.flatnonzero((losses <= goal).all(1)) if goal is not None else np.array([], dtype=int)
    k = int(hit[0]) if len(hit) else len(losses) - 1
    run.reached.append(curve.times[k] if len(hit) else math.inf)
    run.at.append(k + 1)
    run.images.append(curve.images[k])


def time_to(run: Run, goals: np.ndarray) -> float:
    """Seconds until every image of each batch is at or below its goal, summed over batches (inf if never).

    The plain loop's time is its whole run (its reference is its own final loss).
    """
    if run.name.startswith("plain"):
        return sum(run.reached)
    total, first = 0.0, 0
    for times, losses in zip(run.times, run.losses, strict=True):
        n = losses.shape[1]
        hit = np.flatnonzero((losses <= goals[first : first + n]).all(1))
        if not len(hit):
            return math.inf
        total += float(times[min(int(hit[0]), len(times) - 1)])
        first += n
    return total


def plain_run(features, cfg, contents, styles, device, clock) -> Run:
    """The tutorial's loop, one pair at a time."""
    run = Run("plain loop (reference)")
    run_tutorial(features, dataclasses.replace(cfg, iterations=2), contents[:1], styles[:1])  # one-time costs
    for i in range(len(contents)):
        content, style = contents[i : i + 1], styles[i : i + 1]
        curve = Curve(device, clock)
        curve.begin()
        image = run_tutorial(features, cfg, content, style, callback=curve)
        seconds = curve.elapsed()
        run.total_s += seconds
        targets = style_targets(features, style, cfg)
        losses = torch.stack([fp32_losses(features, cfg, content, im, targets) for im in curve.images])
        # the final image (after the last step) is the reference, at the end of the run
        curve.times.append(seconds)
        curve.images.append(image)
        losses = torch.cat([losses, fp32_losses(features, cfg, content, image, targets)[None]]).cpu().numpy()
        goal = losses[-1:]
        record(run, curve, losses, goal)
        run.reached[-1] = seconds  # the plain loop's time is its whole run
    return run


def engine_run(name, features, cfg, contents, styles, batch, device, clock, goals) -> Run:
    """One engine variant over the pairs in batches, with its curve; ``goals`` are the per-pair targets."""
    settings = dict(VARIANTS[name])
    net = features
    run = Run(name)
    if settings.pop("compile", False):
        net = torch.compile(features)
        start = CLOCK[clock]()
        warm = dataclasses.replace(cfg, **settings, iterations=2)
        stylize(net, contents[:batch], style_targets(net, styles[:batch], warm), warm)
        run.extra = f"compilation {CLOCK[clock]() - start:.0f} s, not counted"
    vcfg = dataclasses.replace(cfg, **settings)
    warm = dataclasses.replace(vcfg, iterations=2)  # one-time costs (kernels, primitives) kept out
    stylize(net, contents[:1], style_targets(net, styles[:1], warm), warm)
    for start in range(0, len(contents), batch):
        content, style = contents[start : start + batch], styles[start : start + batch]
        curve = Curve(device, clock)
        curve.begin()
        targets = style_targets(net, style, vcfg)
        stylize(net, content, targets, vcfg, callback=curve)
        run.total_s += curve.elapsed()
        full = {k: v for k, v in targets.items() if k in vcfg.style_layers}
        losses = torch.stack([fp32_losses(features, vcfg, content, im, full) for im in curve.images])
        goal = None if goals is None else goals[start : start + batch]
        record(run, curve, losses.cpu().numpy(), goal)
    return run


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # stda generate's settings: the preset's values for these weights (vgg19-imagenet: Caffe's, VGG19)
    cfg = GenerateConfig(preset=args.preset, weights=args.weights, iterations=args.iterations)
    features = build_vgg_features(cfg.arch, cfg.layers(), cfg.pooling, args.weights).to(device)
    contents, styles, masks = phantom_pairs(args.pairs, args.size, device)
    runs, goals = [], None
    if "arbitrary" in args.engine:
        arbitrary_row(args, device, contents, styles, masks)
    if "gatys" not in args.engine:
        return
    if not args.skip_plain:
        plain_cfg = dataclasses.replace(cfg, coarse_to_fine=0.0, precision="fp32")
        runs.append(plain_run(features, plain_cfg, contents, styles, device, args.clock))
        goals = np.concatenate(runs[0].final) * (1 + args.tolerance[0])
    engine_cfg = dataclasses.replace(cfg, iterations=args.engine_iterations or round(1.5 * args.iterations))
    for name in args.variants:
        runs.append(
            engine_run(name, features, engine_cfg, contents, styles, args.batch, device, args.clock, goals)
        )
    report(args, device, runs, contents, styles, masks)
    if args.plot:
        plot(runs, goals, args)


PAPER_IMAGES = 248_489  # the original work's synthetic set


def arbitrary_row(args, device: torch.device, contents, styles, masks) -> None:
    """Images/s of the pretrained feed-forward engine on the same pairs (style vectors once per style, timed),
    its quality-gate verdicts, and the hours the paper's 248,489 images would take at that rate."""
    from stda_hf.generate import arbitrary

    models = arbitrary.load_models(device, threads=args.threads or None)
    cfg = arbitrary.ArbitraryConfig()
    warm = contents[:1].cpu()
    arbitrary.stylize(models, warm, arbitrary.style_vectors(models, styles[:1].cpu(), cfg), cfg)
    clock = CLOCK[args.clock]
    start, out = clock(), []
    for i in range(0, len(contents), args.batch):
        content, style = contents[i : i + args.batch].cpu(), styles[i : i + args.batch].cpu()
        out.append(
            arbitrary.stylize(models, content, arbitrary.style_vectors(models, style, cfg), cfg).images
        )
    seconds = clock() - start
    images = torch.cat(out)
    verdicts = [r.verdict for r in assess(contents.cpu(), styles.cpu(), images, StyleDistance(), mask=masks)]
    rate = len(images) / seconds
    print(
        f"arbitrary ({models.describe()['provider']}, batch {args.batch}, {args.size} px, {args.clock} clock): "
        f"{rate:.2f} images/s, gate ok {verdicts.count('ok')} of {len(images)}; "
        f"{PAPER_IMAGES:,} images would take {PAPER_IMAGES / rate / 3600:.1f} h"
    )


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), ""
    )
    return f"{cpu or platform.processor()} CPU, {torch.get_num_threads()} threads, {os.cpu_count()} cores"


def report(args, device, runs: list[Run], contents, styles, masks) -> None:
    n = args.pairs
    print(f"machine: {machine(device)}; torch {torch.__version__}; {args.clock} clock")
    print(
        f"{n} pairs, {args.size} px, {args.iterations} evaluations (engine: up to "
        f"{args.engine_iterations or round(1.5 * args.iterations)}), preset {args.preset}, weights {args.weights}; "
        f"engine batch {args.batch}"
    )
    scorer = StyleDistance()
    plain = None if args.skip_plain else runs[0]
    print(
        "| run | s/image to the plain loop's final loss | speed-up | evaluations then | final loss / plain's "
        "| images/s (all evaluations) | gate ok (at the target) |"
    )
    print("|---|---|---|---|---|---|---|")
    details, within_lines, hours = [], [], []
    for run in runs:
        images = torch.cat(run.images).cpu()
        verdicts = [r.verdict for r in assess(contents.cpu(), styles.cpu(), images, scorer, mask=masks)]
        reached = sum(run.reached)
        to_target = f"{reached / n:.2f}" if math.isfinite(reached) else "not reached" if plain else "-"
        speed = f"{sum(plain.reached) / reached:.2f}x" if plain and math.isfinite(reached) else "-"
        final = np.concatenate(run.final)
        ratio = f"{final.mean() / np.concatenate(plain.final).mean():.3f}" if plain else "-"
        evals = "/".join(str(a) for a in run.at)
        note = f" ({run.extra})" if run.extra else ""
        print(
            f"| {run.name}{note} | {to_target} | {speed} | {evals} | {ratio} | {n / run.total_s:.3f} "
            f"| {verdicts.count('ok')} of {n} |"
        )
        hours.append(f"{run.name}: {PAPER_IMAGES * run.total_s / n / 3600:,.0f} h")
        for tol in args.tolerance[1:] if plain else ():
            seconds, plain_s = time_to(run, np.concatenate(plain.final) * (1 + tol)), sum(plain.reached)
            within = (
                f"{seconds / n:.2f} s/image, {plain_s / seconds:.2f}x"
                if math.isfinite(seconds)
                else "not reached"
            )
            within_lines.append(f"{run.name}: to within {tol:.0%} of the plain loop's final loss: {within}")
        if plain:
            lowest = np.concatenate([losses.min(0) for losses in run.losses]) / np.concatenate(plain.final)
            details.append(f"{run.name}: " + " ".join(f"{x:.3g}" for x in lowest))
    if details:
        print("lowest fp32 loss on the curve / the plain loop's final, per pair:")
        print("\n".join(f"  {line}" for line in details))
    print(f"hours for the paper's {PAPER_IMAGES:,} images at these rates ({args.iterations} evaluations for the plain "
          f"loop, the engine's all evaluations): " + "; ".join(hours))  # fmt: skip
    if within_lines:
        print(
            "time to quality with a tolerance (a loss curve that levels off at the target is timed where it levels):"
        )
        print("\n".join(f"  {line}" for line in within_lines))


def plot(runs: list[Run], goals, args) -> None:
    """Loss relative to each pair's target against seconds per image: a colour per run, a line style per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k, run in enumerate(runs):
        first = 0
        for times, losses in zip(run.times, run.losses, strict=True):
            n = losses.shape[1]
            rel = losses / goals[None, first : first + n] if goals is not None else losses
            for j in range(n):  # one line per pair, one line style per pair
                label = run.name if first + j == 0 else None
                style = ("-", "--", ":", "-.")[(first + j) % 4]
                ax.plot(times / n, rel[:, j], label=label, color=f"C{k}", ls=style, lw=1.2)
            first += n
    if goals is not None:
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel(f"seconds per image ({args.clock} clock)")
    ax.set_ylabel("fp32 loss / plain loop's final (per pair)" if goals is not None else "fp32 loss")
    ax.set_title(
        f"time to quality: {args.pairs} phantom pairs, {args.size} px, {args.weights} weights, "
        f"{torch.get_num_threads()} thread(s)",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
