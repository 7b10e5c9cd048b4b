"""Image classifiers for train.py: VGG8, torchvision VGG11/VGG16 and ``transformers`` models, saved as Hub models.

Our VGGs are ``transformers`` models (:class:`StdaVGGForImageClassification`, model type ``stda-vgg``, with
:class:`StdaImageProcessor`): :func:`save_model` writes ``model.safetensors`` + ``config.json`` +
``preprocessor_config.json`` and the three code files, so ``AutoModelForImageClassification``,
``AutoImageProcessor`` and ``pipeline("image-classification", trust_remote_code=True)`` load a trained model
by Hub id without ``stda_hf`` installed; with ``stda_hf.models`` imported, the Auto classes know the type
without remote code. Other ``transformers`` models use their own classes. Class ids follow
:data:`stda_hf.LABELS` (0 benign, 1 malignant).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stda_hf import LABELS
from stda_hf.core.errors import StdaError
from stda_hf.core.fileio import write_json
from stda_hf.core.statefile import Fields, check_regular, read_json
from stda_hf.core.utils import progress_disabled
from stda_hf.data.images import DEFAULT_RESIZE, Fit, check_resize
from stda_hf.models.configuration_stda_vgg import StdaVGGConfig
from stda_hf.models.image_processing_stda_vgg import StdaImageProcessor
from stda_hf.models.modeling_stda_vgg import StdaVGGForImageClassification, build_classifier, build_features
from stda_hf.models.weights import WeightsSpec, load_weights, parse_weights, read_state_dict

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
"""The sub-folder of a train.py run folder that holds its final model (what ``transformers`` loads)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_VGGS = ("vgg11", "vgg11_bn", "vgg16", "vgg16_bn")
MODEL_NAMES = ("vgg8", *TORCHVISION_VGGS)
"""Architectures built here; any other name is read as a ``transformers`` model id or local folder."""
PREPROCESSOR_FILE = "preprocessor_config.json"


def register_auto_classes() -> None:
    """Tell the ``transformers`` Auto classes about ``stda-vgg``, and save our code with every model.

    Called when :mod:`stda_hf.models` is imported (that import loads ``transformers``; ``import stda_hf``
    alone does not).
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    AutoConfig.register(StdaVGGConfig.model_type, StdaVGGConfig, exist_ok=True)
    AutoModelForImageClassification.register(StdaVGGConfig, StdaVGGForImageClassification, exist_ok=True)
    try:  # transformers 5: one class per backend; ours is both (PIL resize, then torch arithmetic)
        backends = {"pil": StdaImageProcessor, "torchvision": StdaImageProcessor}
        AutoImageProcessor.register(StdaVGGConfig, image_processor_classes=backends, exist_ok=True)
    except TypeError:  # transformers 4
        AutoImageProcessor.register(
            StdaVGGConfig, slow_image_processor_class=StdaImageProcessor, exist_ok=True
        )
    StdaVGGConfig.register_for_auto_class()
    StdaVGGForImageClassification.register_for_auto_class("AutoModelForImageClassification")
    StdaImageProcessor.register_for_auto_class("AutoImageProcessor")


class VGG8(nn.Module):
    """VGG8: eight weight layers, five 3x3 convolution blocks then three fully connected layers.

    The original paper does not publish its layer list; this is ours, in the VGG family's naming (VGG-n counts
    the weight layers). With the defaults (``widths=(64, 128, 256, 512, 512)``, ``hidden=(512, 512)``,
    ``pool_size=2``, ``batch_norm=True``, ``dropout=0.5``, 2 classes):

    ====  ===========================================================================  ==========
    #     layer                                                                        output
    ====  ===========================================================================  ==========
    1     Conv2d(3, 64, 3x3, padding 1) - BatchNorm2d - ReLU - MaxPool2d(2)            64 x H/2
    2     Conv2d(64, 128, 3x3, padding 1) - BatchNorm2d - ReLU - MaxPool2d(2)          128 x H/4
    3     Conv2d(128, 256, 3x3, padding 1) - BatchNorm2d - ReLU - MaxPool2d(2)         256 x H/8
    4     Conv2d(256, 512, 3x3, padding 1) - BatchNorm2d - ReLU - MaxPool2d(2)         512 x H/16
    5     Conv2d(512, 512, 3x3, padding 1) - BatchNorm2d - ReLU - MaxPool2d(2)         512 x H/32
    -     AdaptiveAvgPool2d(2) - Flatten                                               2048
    6     Linear(2048, 512) - ReLU - Dropout(0.5)                                      512
    7     Linear(512, 512) - ReLU - Dropout(0.5)                                       512
    8     Linear(512, 2)                                                               2 logits
    ====  ===========================================================================  ==========

    Max pooling rounds up (``ceil_mode``), so with the adaptive pooling any input from 32 to 224+ pixels works. Only ``nn`` modules appear in
    ``forward`` (Conv2d, BatchNorm2d, ReLU, MaxPool2d, AdaptiveAvgPool2d, Flatten, Linear, Dropout), each
    batch norm directly after its convolution, so Zennit's canonizers and rules apply (Deep Taylor
    Decomposition). :meth:`layer_list` prints the list for any setting.

    This plain module returns the logits tensor; :class:`StdaVGGForImageClassification` holds the same layers
    under the same names as a ``transformers`` model (what :func:`build_model` returns, train.py trains and
    :func:`save_model` writes). ``self.config`` is that model's configuration.

    Parameters
    ----------
    num_classes : int
        Output logits (2: benign, malignant).
    widths : sequence of 5 int
        Channels of the five convolution layers.
    hidden : sequence of 2 int
        Units of the first two fully connected layers.
    batch_norm : bool
        Batch normalisation after each convolution.
    dropout : float
        Dropout probability after the first two fully connected layers.
    pool_size : int
        Side of the adaptive average pooling before the classifier.
    in_channels : int
        Input channels (3 for RGB).
    """

    def __init__(
        self,
        num_classes: int = 2,
        widths: Sequence[int] = (64, 128, 256, 512, 512),
        hidden: Sequence[int] = (512, 512),
        batch_norm: bool = True,
        dropout: float = 0.5,
        pool_size: int = 2,
        in_channels: int = 3,
    ):
        super().__init__()
        widths, hidden = _check_vgg8(widths, hidden, dropout, pool_size, num_classes)
        self.config = vgg_config("vgg8", num_classes, widths=widths, hidden=hidden, batch_norm=batch_norm,
                                 dropout=dropout, pool_size=pool_size, in_channels=in_channels)  # fmt: skip
        _add_layers(self, self.config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of images ``(N, 3, H, W)`` normalised per :class:`Preprocessing`."""
        return self.classifier(self.flatten(self.avgpool(self.features(x))))

    def layer_list(self) -> list[str]:
        """The eight weight layers with what follows each, one line per layer (for cards and logs)."""
        return layer_list(self)


def vgg_config(arch: str, num_classes: int = 2, **fields: Any) -> StdaVGGConfig:
    """The ``transformers`` configuration of a VGG with ``num_classes`` outputs named after :data:`LABELS`."""
    labels = {i: LABELS[i] if i < len(LABELS) else str(i) for i in range(num_classes)}
    return StdaVGGConfig(arch=arch, id2label=labels, **fields)


def _add_layers(module: nn.Module, config: StdaVGGConfig) -> None:
    """Give ``module`` the layers of ``config`` under torchvision's names (what both VGG classes hold)."""
    module.features = build_features(config)
    module.avgpool = nn.AdaptiveAvgPool2d(config.pool_size)
    module.flatten = nn.Flatten(1)
    module.classifier = build_classifier(config)


def _check_vgg8(widths, hidden, dropout, pool_size, num_classes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    widths, hidden = tuple(int(w) for w in widths), tuple(int(h) for h in hidden)
    if len(widths) != 5 or min(widths) < 1:
        raise StdaError(f"VGG8 needs 5 positive convolution widths (--vgg8-widths); got {list(widths)}")
    if len(hidden) != 2 or min(hidden) < 1:
        raise StdaError(f"VGG8 needs 2 positive hidden sizes (--vgg8-hidden); got {list(hidden)}")
    if not 0.0 <= dropout < 1.0:
        raise StdaError(f"dropout must be in [0, 1); got {dropout}")
    if pool_size < 1 or num_classes < 2:
        raise StdaError(f"pool_size must be >= 1 and num_classes >= 2; got {pool_size}, {num_classes}")
    return widths, hidden


def _describe_layers(modules: Sequence[nn.Module]) -> list[str]:
    """Group modules into one line per weight layer: ``1. Conv2d(3, 64, 3x3) - BatchNorm2d - ReLU - ...``."""
    lines: list[list[str]] = [[]]
    for m in modules:
        if isinstance(m, (nn.Conv2d, nn.Linear)) and lines[-1]:
            lines.append([])
        lines[-1].append(_short(m))
    return [f"{i}. " + " - ".join(parts) for i, parts in enumerate(lines, start=1)]


def _short(m: nn.Module) -> str:
    if isinstance(m, nn.Conv2d):
        k = "x".join(str(s) for s in m.kernel_size)
        return f"Conv2d({m.in_channels}, {m.out_channels}, {k}, padding {m.padding[0]})"
    if isinstance(m, nn.Linear):
        return f"Linear({m.in_features}, {m.out_features})"
    if isinstance(m, nn.MaxPool2d):
        return f"MaxPool2d({m.kernel_size})"
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return f"AdaptiveAvgPool2d({m.output_size})"
    if isinstance(m, nn.Dropout):
        return f"Dropout({m.p})"
    return type(m).__name__


class TorchvisionVGG(nn.Module):
    """A torchvision VGG (11 or 16 weight layers, with or without batch norm) with a ``num_classes`` head.

    Parameter names are torchvision's (``features.*``, ``classifier.*``), so torchvision ImageNet weights and
    files saved from torchvision load directly; :func:`build_model` puts them in. Like :class:`VGG8`, a plain
    module returning logits; ``self.config`` describes it as a :class:`StdaVGGForImageClassification`.

    Parameters
    ----------
    arch : {"vgg11", "vgg11_bn", "vgg16", "vgg16_bn"}
        The torchvision architecture.
    num_classes : int
        Output logits.
    dropout : float
        Dropout probability of the classifier.
    """

    def __init__(self, arch: str = "vgg11", num_classes: int = 2, dropout: float = 0.5):
        super().__init__()
        if arch not in TORCHVISION_VGGS:
            raise StdaError(f"unknown torchvision VGG {arch!r}; valid: {list(TORCHVISION_VGGS)}")
        self.config = vgg_config(arch, num_classes, dropout=dropout)
        _add_layers(self, self.config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)``."""
        return self.classifier(self.flatten(self.avgpool(self.features(x))))

    def layer_list(self) -> list[str]:
        """The weight layers with what follows each, one line per layer."""
        return layer_list(self)


def replace_head(model: nn.Module, num_classes: int, seed: int = 0) -> None:
    """Swap the last linear layer of a VGG for a fresh, seeded one with ``num_classes`` outputs (config too)."""
    old = model.classifier[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.classifier[-1] = nn.Linear(old.in_features, num_classes)
    labels = vgg_config(model.config.arch, num_classes).id2label
    model.config.id2label, model.config.label2id = labels, {v: k for k, v in labels.items()}


@dataclass(frozen=True)
class Preprocessing:
    """How images reach a model: resized to ``image_size`` square in resize mode ``resize`` (crop, pad or squash:
    :func:`~stda_hf.data.images.fit_image`), scaled to [0, 1], then normalised."""

    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = DEFAULT_RESIZE

    def __post_init__(self) -> None:
        check_resize(self.resize)

    def to_json(self) -> dict[str, Any]:
        """A ``preprocessor_config.json`` that ``transformers.AutoImageProcessor`` also reads."""
        return {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": True,
            "size": {"height": self.image_size, "width": self.image_size},
            "resample": 2,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "resize_mode": self.resize,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Preprocessing:
        """Read the fields back from a ``preprocessor_config.json`` (ours or a ``transformers`` one).

        A file without ``resize_mode`` (a model saved before the choice existed, or another library's) squashes,
        as those models were trained and as ``transformers``' own processors resize to height x width.
        """
        size = data.get("size", 224)
        if isinstance(size, dict):
            size = size.get("height") or size.get("shortest_edge") or 224
        return cls(
            image_size=int(size),
            mean=tuple(data.get("image_mean", IMAGENET_MEAN)),
            std=tuple(data.get("image_std", IMAGENET_STD)),
            resize=check_resize(data.get("resize_mode", "squash"), flag=f"{PREPROCESSOR_FILE}: resize_mode"),
        )


def eval_transform(pre: Preprocessing) -> Callable:
    """The evaluation pipeline (resize in ``pre.resize`` mode, scale, normalise, no augmentation) for anything fed
    to a trained model: validation and test in training, explanations and pseudo-labelling elsewhere.

    The resize is PIL bilinear (:class:`~stda_hf.data.images.Fit`); ``squash`` gives the pixels of torchvision's
    ``Resize((size, size))`` on a PIL image bit for bit."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            Fit(pre.image_size, pre.resize),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(pre.mean, pre.std),
        ]
    )


def build_model(
    name: str, weights: str = "auto", num_classes: int = 2, seed: int = 0, **options: Any
) -> nn.Module:
    """Build a classifier by name with its weights.

    Parameters
    ----------
    name : str
        ``vgg8``, ``vgg11``, ``vgg11_bn``, ``vgg16``, ``vgg16_bn``, or a ``transformers`` image-classification
        model id (``org/name``) or local folder.
    weights : str
        ``auto`` (VGG8: random; torchvision: ImageNet; transformers: the checkpoint's), ``imagenet``,
        ``random`` (seeded by ``seed``) or a ``.safetensors``/``.pth`` file.
    num_classes : int
        Output logits (the head is replaced when the weights have another number of classes).
    seed : int
        Seed of random initialisation (also of a replaced head).
    **options
        VGG8: ``widths``, ``hidden``, ``batch_norm``, ``dropout``, ``pool_size``; torchvision: ``dropout``.

    Raises
    ------
    StdaError
        Unknown name or option, unavailable weights (offline download, missing file, other architecture).
    """
    if name == "vgg8":
        spec = parse_weights("random" if weights == "auto" else weights, seed=seed)
        config = VGG8(num_classes=num_classes, **_only(options, VGG8, name)).config  # checks the options
        return load_weights(StdaVGGForImageClassification(config), spec, strict=True)
    if name in TORCHVISION_VGGS:
        return _build_torchvision(name, weights, num_classes, seed, _only(options, TorchvisionVGG, name))
    if _looks_like_transformers(name):
        return _build_transformers(name, weights, num_classes, seed)
    raise StdaError(
        f"unknown model {name!r}; valid: {list(MODEL_NAMES)}, or a transformers image-classification model "
        "id (org/name) or local folder"
    )


def _only(options: dict[str, Any], cls: type, name: str) -> dict[str, Any]:
    valid = set(inspect.signature(cls.__init__).parameters) - {"self", "num_classes", "arch"}
    bad = sorted(set(options) - valid)
    if bad:
        raise StdaError(f"model {name!r} takes no option(s) {bad}; valid: {sorted(valid)}")
    return options


def _build_torchvision(
    name: str, weights: str, num_classes: int, seed: int, options: dict
) -> StdaVGGForImageClassification:
    spec = parse_weights("imagenet" if weights == "auto" else weights, seed=seed)
    if spec.kind == "random":
        return load_weights(StdaVGGForImageClassification(vgg_config(name, num_classes, **options)), spec)
    state = _imagenet_state(name) if spec.kind == "imagenet" else read_state_dict(spec.path)
    head = _head_size(state) or num_classes
    model = StdaVGGForImageClassification(vgg_config(name, head, **options))
    load_weights(model, WeightsSpec("imagenet"), download=lambda: state, strict=True)
    if head != num_classes:
        replace_head(model, num_classes, seed)
    return model


def _imagenet_state(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights of ``name``, downloaded before the model is built (fails fast offline)."""
    import torchvision

    enum = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    try:
        return enum.get_state_dict(progress=False)
    except Exception as err:  # URLError, ConnectionError, HTTP errors, hash mismatch
        raise StdaError(
            f"could not download the ImageNet weights of {name} ({type(err).__name__}: {err}). Offline? Pass "
            "--weights PATH to a local .safetensors/.pth file, or --weights random for untrained features"
        ) from err


def _head_size(state: dict[str, torch.Tensor]) -> int | None:
    weight = state.get("classifier.6.weight")
    return int(weight.shape[0]) if weight is not None else None


def _looks_like_transformers(name: str) -> bool:
    path = Path(name)
    if path.is_dir():
        return (path / "config.json").is_file()
    return name.count("/") == 1 and not name.startswith((".", "/"))


def _build_transformers(name: str, weights: str, num_classes: int, seed: int) -> nn.Module:
    from transformers import AutoConfig, AutoModelForImageClassification

    labels = {i: LABELS[i] if i < len(LABELS) else str(i) for i in range(num_classes)}
    kwargs = {"num_labels": num_classes, "id2label": labels, "label2id": {v: k for k, v in labels.items()}}
    try:
        if weights == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(name, **kwargs))
        if weights != "auto":
            raise StdaError(
                f"--weights {weights!r} does not apply to transformers model {name}; use auto or random"
            )
        return AutoModelForImageClassification.from_pretrained(name, ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError) as err:
        raise StdaError(
            f"cannot load transformers model {name!r} ({err}); give a local folder, or check the id and that "
            "the Hub is reachable (HF_HUB_OFFLINE=1 allows only cached models)"
        ) from err


def default_preprocessing(name: str, image_size: int) -> Preprocessing:
    """ImageNet statistics at ``image_size``; a ``transformers`` model's own mean and std when it has them."""
    if name in MODEL_NAMES or not _looks_like_transformers(name):
        return Preprocessing(image_size)
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):
        logger.info("%s has no image processor; using ImageNet mean and std", name)
        return Preprocessing(image_size)
    mean, std = getattr(proc, "image_mean", IMAGENET_MEAN), getattr(proc, "image_std", IMAGENET_STD)
    return Preprocessing(image_size, tuple(mean), tuple(std))


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of any classifier's output (a tensor, or a ``transformers`` output with ``.logits``)."""
    return output if isinstance(output, torch.Tensor) else output.logits


@contextlib.contextmanager
def quiet_transformers_bars() -> Iterator[None]:
    """Silence ``transformers``' own loading/saving bars while ours are off (:func:`~stda_hf.core.utils.progress`)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if was_on and progress_disabled():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def as_transformers(model: nn.Module) -> nn.Module:
    """``model`` as a ``transformers`` model: our plain VGG modules become :class:`StdaVGGForImageClassification`
    with the same weights; ``transformers`` models are returned as they are."""
    if isinstance(model, (VGG8, TorchvisionVGG)):
        hf = StdaVGGForImageClassification(model.config)
        hf.load_state_dict(model.state_dict(), strict=True)
        return hf.train(model.training)
    return model


def image_processor(preprocessing: Preprocessing) -> StdaImageProcessor:
    """The image processor that feeds a model exactly as :func:`eval_transform` does."""
    pre = preprocessing
    return StdaImageProcessor(
        size=pre.image_size, image_mean=list(pre.mean), image_std=list(pre.std), resize_mode=pre.resize
    )


def save_model(model: nn.Module, folder: str | Path, preprocessing: Preprocessing) -> Path:
    """Save ``model`` in ``folder`` as a Hub model: weights, ``config.json``, ``preprocessor_config.json``.

    Our VGGs are saved with their code files (``configuration_stda_vgg.py``, ``modeling_stda_vgg.py``,
    ``image_processing_stda_vgg.py``) and an ``auto_map``, so ``trust_remote_code=True`` loads them anywhere.
    Other ``transformers`` models keep their own classes and get a ``ViTImageProcessor``-type preprocessor
    file (built in, no remote code; it resizes through ``transformers``' own code, so its pixels may differ
    from :func:`eval_transform` in the last float bits).
    """
    folder = Path(folder)
    model = as_transformers(model)
    with quiet_transformers_bars():
        model.save_pretrained(folder)
    if isinstance(model, StdaVGGForImageClassification):
        image_processor(preprocessing).save_pretrained(folder)
    else:
        write_json(folder / PREPROCESSOR_FILE, preprocessing.to_json())
    _weights_mode_like_config(folder)
    return folder


def _weights_mode_like_config(folder: Path) -> None:
    """Give the weight files the permissions of ``config.json`` (the umask's): ``transformers`` 5 writes
    ``model.safetensors`` through a private temporary file, mode 0600, which a shared model folder must not keep."""
    mode = (folder / "config.json").stat().st_mode & 0o777
    for weights in folder.glob("*.safetensors"):
        weights.chmod(mode)


def model_folder(path: str | Path) -> Path:
    """The folder holding the model: ``path`` itself, or the ``model/`` (:data:`MODEL_DIR`) of a train.py run."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / MODEL_DIR / "config.json").is_file():
        return path / MODEL_DIR
    return path


def run_folder(model_dir: Path) -> Path:
    """The train.py run folder a model folder belongs to: the parent of a ``model/``, else the folder itself."""
    return model_dir.parent if model_dir.name == MODEL_DIR else model_dir


def load_model(folder: str | Path) -> tuple[nn.Module, Preprocessing]:
    """Load a classifier saved by :func:`save_model` in eval mode, with its preprocessing.

    ``folder`` is a model folder (``config.json`` + ``model.safetensors``) or a train.py run folder (its
    ``model/`` sub-folder is used). Folders written before our VGGs were ``transformers`` models (a
    ``config.json`` with ``stda_architecture``) load too.

    Raises
    ------
    StdaError
        When ``folder`` holds no ``config.json`` or an architecture this project does not know.
    """
    folder = model_folder(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise StdaError(f"{folder} holds no config.json; give a model folder written by train.py")
    config = read_json(config_file, Fields(), recover=_RESAVE)
    check_model_folder(folder, config)
    if "stda_architecture" in config:
        model = _load_pre_transformers_folder(folder, config)
    elif "model_type" in config:
        from transformers import AutoModelForImageClassification

        with quiet_transformers_bars():  # our type is registered: no remote code runs for it
            model = AutoModelForImageClassification.from_pretrained(folder)
    else:
        raise StdaError(f"{config_file}: neither a transformers model (model_type) nor a model of stda-hf")
    pre_file = folder / PREPROCESSOR_FILE
    pre = read_json(pre_file, Fields(), recover=_RESAVE, default={})
    return model.eval(), Preprocessing.from_json(pre)


_RESAVE = "give the model folder train.py wrote (its model/), or save the model again"
WEIGHTS_FILE = "model.safetensors"


def check_model_folder(folder: Path, config: dict[str, Any]) -> None:
    """Refuse a model folder whose weights do not fit its ``config.json``, before ``transformers`` loads it.

    ``transformers`` fills a weight missing from the file with random values (a warning at most), and a
    truncated file or a classifier of another width fails deep inside it; here each is one line. Checked: the
    ``model.safetensors`` file (or the shards of ``model.safetensors.index.json``) is complete, and every
    tensor has the shape ``config.json`` implies (classes, layer widths); for this project's VGGs no tensor is
    missing or extra. Folders without safetensors weights are left to ``transformers``.

    Raises
    ------
    StdaError
        Naming the folder, the first tensor that does not fit (both shapes) or the truncated file.
    """
    found = _safetensors_shapes(folder)
    if found is None:
        return
    expected = _expected_shapes(folder, config)
    if expected is None:
        return
    for name, shape in expected.items():
        if name in found and found[name] != shape:
            raise StdaError(
                f"{folder}: the weights do not match config.json: {name} is {found[name]} in the weights but "
                f"{shape} by config.json ({_classes(config)}); {_RESAVE}"
            )
    if "stda_architecture" in config or config.get("model_type") == StdaVGGConfig.model_type:
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        if missing or extra:
            what = f"lack {missing[0]}" if missing else f"hold {extra[0]}, which config.json has no place for"
            more = len(missing) + len(extra) - 1
            raise StdaError(
                f"{folder}: the weights do not match config.json: they {what}"
                f"{f' (and {more} more)' if more else ''}; {_RESAVE}"
            )


def _classes(config: dict[str, Any]) -> str:
    labels = config.get("id2label") or {}
    count = len(labels) if labels else config.get("num_classes", config.get("num_labels", "?"))
    return f"{count} classes"


def _safetensors_shapes(folder: Path) -> dict[str, list[int]] | None:
    """Tensor name -> shape from the safetensors header(s) of ``folder``; None without safetensors weights."""
    single, index = folder / WEIGHTS_FILE, folder / f"{WEIGHTS_FILE}.index.json"
    if single.exists():
        return read_safetensors_header(single)
    if not index.exists():
        return None
    weight_map = read_json(index, Fields(required={"weight_map": dict}), recover=_RESAVE)["weight_map"]
    shapes: dict[str, list[int]] = {}
    for shard in sorted(set(map(str, weight_map.values()))):
        shard_path = folder / shard
        if Path(shard).name != shard or not shard_path.is_file():
            raise StdaError(
                f"{index} names the weight file {shard!r}, which {folder} does not hold; {_RESAVE}"
            )
        shapes.update(read_safetensors_header(shard_path))
    return shapes


def read_safetensors_header(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape of the safetensors file ``path``, after checking it is complete (no tensor read).

    Raises
    ------
    StdaError
        Not a safetensors file, or truncated (fewer bytes than its header announces).
    """
    check_regular(path, _RESAVE)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= length <= min(size - 8, 100 << 20):
            raise StdaError(f"{path} is not a complete safetensors file ({size} bytes); {_RESAVE}")
        try:
            header = json.loads(fh.read(length))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
            shapes = {k: [int(n) for n in v["shape"]] for k, v in tensors.items()}
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise StdaError(f"{path} has no readable safetensors header; {_RESAVE}") from None
    if 8 + length + end > size:
        raise StdaError(
            f"{path} is truncated: {size:,} bytes, but its header announces {8 + length + end:,}; {_RESAVE}"
        )
    return shapes


def _expected_shapes(folder: Path, config: dict[str, Any]) -> dict[str, list[int]] | None:
    """Tensor name -> shape of the model ``config`` describes, built without memory (meta device)."""
    try:
        with torch.device("meta"):
            if "stda_architecture" in config:
                return {k: list(v.shape) for k, v in _plain_from_config(folder, config).state_dict().items()}
            if "model_type" not in config:
                return None
            from transformers import AutoConfig, AutoModelForImageClassification

            with quiet_transformers_bars():
                model = AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(folder))
            return {k: list(v.shape) for k, v in model.state_dict().items()}
    except StdaError:
        raise
    except (ValueError, TypeError, KeyError, OSError, RuntimeError) as err:
        raise StdaError(
            f"{folder / 'config.json'} does not describe a model this version can build "
            f"({' '.join(str(err).split())[:200]}); {_RESAVE}"
        ) from None


def _plain_from_config(folder: Path, config: dict[str, Any]) -> nn.Module:
    """The plain VGG a folder of earlier versions describes (random weights)."""
    arch = config["stda_architecture"]
    fields = {k: v for k, v in config.items() if k not in ("stda_architecture", "num_classes", "arch")}
    if arch == "VGG8":
        return VGG8(num_classes=config.get("num_classes", 2), **fields)
    if arch == "TorchvisionVGG":
        return TorchvisionVGG(config.get("arch", "vgg11"), config.get("num_classes", 2), **fields)
    raise StdaError(f"{folder / 'config.json'}: unknown architecture {arch!r}; known: VGG8, TorchvisionVGG")


def _load_pre_transformers_folder(folder: Path, config: dict[str, Any]) -> StdaVGGForImageClassification:
    """A model folder saved by the ``PyTorchModelHubMixin`` of earlier versions (same parameter names)."""
    from safetensors.torch import load_file

    plain = _plain_from_config(folder, config)
    plain.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return as_transformers(plain)


def describe_weights(name: str, weights: str, seed: int) -> str:
    """How a model card names the initial weights (``random(seed=0)``, ``imagenet``, ``file:x.safetensors``)."""
    if name not in MODEL_NAMES:
        return WeightsSpec("random", seed=seed).describe() if weights == "random" else f"pretrained ({name})"
    if weights == "auto":
        weights = "random" if name == "vgg8" else "imagenet"
    if weights in ("random", "imagenet"):
        return WeightsSpec(weights, seed=seed).describe()
    return f"file:{Path(weights).name}"


def layer_list(model: nn.Module) -> list[str]:
    """The weight layers of a VGG (ours or torchvision's), one line each; a class name for other models."""
    parts = ("features", "avgpool", "flatten", "classifier")
    if not all(hasattr(model, p) for p in parts):
        return [type(model).__name__]
    return _describe_layers([*model.features, model.avgpool, model.flatten, *model.classifier])
