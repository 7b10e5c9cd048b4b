"""The attribution engine: Deep Taylor Decomposition (and baselines) through Zennit, as pure tensor functions.

* :func:`make_composite` builds an attribution method by name. ``dtd`` is Deep Taylor Decomposition
  (Montavon et al. 2017): the z+ rule for every hidden convolution and linear layer, the bounded z^B rule
  (zennit's ``ZBox``) for the first layer with the box taken from the input normalisation
  (:func:`input_bounds`), and batch norm merged into the layer before it by zennit's
  ``SequentialMergeBatchNorm`` canonizer. Zennit's own composites (``epsilon_plus_flat``,
  ``epsilon_gamma_box``, ...) and the plain ``gradient`` serve as baselines.
* :func:`explain_batch` runs one of them on a batch inside zennit's attributor context
  (``with Gradient(model, composite)``), which removes the rule hooks and canonizers on leaving, as the
  log-odds head is removed; so the model computes exactly what it computed before.
* :func:`conservation` and :func:`negative_fraction` are the checks that hold for DTD: input relevance sums to
  the explained score (for bias-free layers; biases absorb the rest) and is non-negative.

Torch and zennit only: no files, no datasets. Where the relevance lies is measured by
:mod:`stda_hf.attribution.relevance`; :mod:`stda_hf.explain.stage` (the ``stda explain`` stage) and :mod:`stda_hf.attribution.hook`
(explanations during training) feed images in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import COMPOSITES, SpecialFirstLayerMapComposite, layer_map_base
from zennit.core import Composite
from zennit.rules import ZBox, ZPlus
from zennit.types import Linear

from stda_hf.core.errors import StdaError
from stda_hf.models.vgg import IMAGENET_MEAN, IMAGENET_STD

GRADIENT_METHODS = ("gradient", "guided_backprop", "deconvnet", "beta_smooth")
"""Methods that modify or use the gradient itself: they explain a unit output, not the logit's value."""


COMPOSITE_NAMES = ("dtd", "dtd_strict", "gradient", *sorted(COMPOSITES))
"""Every attribution method :func:`make_composite` knows, ``dtd`` first. ``dtd_strict`` is DTD with every bias
zeroed (zennit's ``zero_params=["bias"]``, after batch norm is merged into the convolutions), the strict z+ and
z^B rules of Montavon et al. (2017): relevance is then conserved (input relevance sums to the explained score),
where ``dtd`` keeps the biases and lets them absorb part of it."""


# ----------------------------------------------------------------------------------------------------------------
# Composites by name


def check_composite_name(name: str) -> str:
    """Return ``name`` when it is a known attribution method; otherwise raise listing the valid ones."""
    if name not in COMPOSITE_NAMES:
        raise StdaError(f"unknown attribution method {name!r}; valid methods: {', '.join(COMPOSITE_NAMES)}")
    return name


def input_bounds(
    mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> tuple[torch.Tensor, torch.Tensor]:
    """The box of possible network inputs, ``(low, high)`` of shape ``(1, C, 1, 1)``.

    Pixels in ``[0, 1]`` normalised by ``(x - mean) / std`` lie in ``[-mean / std, (1 - mean) / std]`` per
    channel; the z^B rule needs these bounds for the first layer.
    """
    if len(mean) != len(std) or not all(s > 0 for s in std):
        raise StdaError(f"input normalisation mean={mean} std={std}: need one positive std per mean")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (0.0 - mean_t) / std_t, (1.0 - mean_t) / std_t


def dtd_composite(low: torch.Tensor, high: torch.Tensor, strict: bool = False) -> Composite:
    """Deep Taylor Decomposition: z^B on the first linear layer, z+ on every other, batch norm merged.

    ``strict`` zeroes every bias in the rules (``zero_params=["bias"]``), the merged batch-norm shifts
    included, so the relevance is conserved layer by layer.
    """
    zero = ["bias"] if strict else None
    return SpecialFirstLayerMapComposite(
        layer_map=[*layer_map_base(), (Linear, ZPlus(zero_params=zero))],
        first_map=[(Linear, ZBox(low=low, high=high, zero_params=zero))],
        canonizers=[SequentialMergeBatchNorm()],
    )


def make_composite(name: str, low: torch.Tensor, high: torch.Tensor) -> Composite | None:
    """The zennit composite called ``name`` (``None`` for the plain gradient), batch norm merged.

    Parameters
    ----------
    name : str
        One of :data:`COMPOSITE_NAMES`.
    low, high : torch.Tensor
        Input bounds from :func:`input_bounds`, used by the rules that need a box (``dtd``,
        ``epsilon_gamma_box``).

    Raises
    ------
    StdaError
        For an unknown name; the message lists the valid ones.
    """
    check_composite_name(name)
    if name == "gradient":
        return None
    if name in ("dtd", "dtd_strict"):
        return dtd_composite(low, high, strict=name == "dtd_strict")
    cls = COMPOSITES[name]
    kwargs = {"low": low, "high": high} if name == "epsilon_gamma_box" else {}
    return cls(canonizers=[SequentialMergeBatchNorm()], **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Running an explanation


OUTPUTS = ("log_odds", "logit")
"""What is explained: ``log_odds`` (the target logit minus the mean of the other logits: for two classes the
log-odds of the target, positive for the predicted class) or ``logit`` (the raw target logit, as iNNvestigate's
DTD does; it can be negative, and then so is all DTD relevance)."""


@dataclass
class Explanation:
    """Relevance of a batch, and what was explained."""

    relevance: torch.Tensor  # (N, C, H, W) input relevance
    logits: torch.Tensor  # (N, K) model outputs
    target: torch.Tensor  # (N,) class index explained
    explained: torch.Tensor  # (N,) output relevance put in: the explained score, or 1 for gradient methods

    @property
    def pixels(self) -> torch.Tensor:
        """Relevance per pixel ``(N, H, W)``: the sum over colour channels."""
        return pixel_relevance(self.relevance)

    @property
    def probs(self) -> torch.Tensor:
        """Softmax class probabilities ``(N, K)``."""
        return self.logits.softmax(dim=1)


class _Logits(nn.Module):
    """The model as relevance needs it: logits as a tensor (transformers outputs carry ``.logits``), in full
    precision (the autocast wrapper that accelerate puts around ``forward`` for mixed precision keeps the
    original as ``_original_forward``; the layers, and so zennit's hooks on them, run either way)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = getattr(self.model, "_original_forward", self.model)(x)
        return out if isinstance(out, torch.Tensor) else out.logits


def explain_batch(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | None = None,
    method: str = "dtd",
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    output: str = "log_odds",
) -> Explanation:
    """Explain one output score of ``model`` per image of a batch of normalised images.

    The model is put in eval mode for the explanation and returned to its previous mode; zennit's hooks, the
    batch-norm merge and the log-odds head are removed even when the attribution fails, so the model computes
    exactly what it computed before. Parameter gradients are not touched.

    Parameters
    ----------
    model : nn.Module
        A classifier returning logits ``(N, K)`` (or an object with ``.logits``).
    x : torch.Tensor
        Normalised images ``(N, C, H, W)`` on the model's device.
    target : torch.Tensor, optional
        Class index per image; the predicted class when omitted.
    method : str
        One of :data:`COMPOSITE_NAMES`.
    mean, std : tuple of float
        The input normalisation, for the input bounds of the z^B rule.
    output : str
        One of :data:`OUTPUTS`: explain the target's log-odds (default) or its raw logit.

    Returns
    -------
    Explanation
        Relevance ``(N, C, H, W)`` whose sum approximates the explained score (relevance methods), logits,
        target and the explained score.

    Raises
    ------
    StdaError
        Unknown method or output, or (for ``log_odds``) no final linear layer with one output per class.
    """
    check_composite_name(method)
    if output not in OUTPUTS:
        raise StdaError(f"unknown output {output!r} to explain; valid: {', '.join(OUTPUTS)}")
    wrapped, was_training = _Logits(model), model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = wrapped(x)
        chosen = logits.argmax(dim=1) if target is None else target.to(logits.device)
        with _score_head(wrapped, logits, output) as scores:
            relevance = _attribute(wrapped, x, chosen, method, _bounds_on(x, mean, std), scores)
    finally:
        model.train(was_training)
    explained = scores.gather(1, chosen[:, None])[:, 0]
    if method in GRADIENT_METHODS:
        explained = torch.ones_like(explained)
    return Explanation(relevance, logits, chosen, explained)


def _bounds_on(x: torch.Tensor, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    low, high = input_bounds(mean, std)
    if low.shape[1] != x.shape[1]:
        raise StdaError(f"input normalisation has {low.shape[1]} channels, the images have {x.shape[1]}")
    return low.to(x), high.to(x)


def _attribute(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, method: str, bounds, scores: torch.Tensor
) -> torch.Tensor:
    """Input relevance of ``target`` under ``method``; zennit's attributor context registers the composite
    on entry and removes it on exit, whatever happens."""
    composite = make_composite(method, *bounds)
    onehot = torch.zeros_like(scores).scatter_(1, target[:, None], 1.0)
    attr_output = onehot if method in GRADIENT_METHODS else onehot * scores
    with Gradient(model, composite) as attributor, torch.enable_grad():
        out, relevance = attributor(x.detach(), attr_output)
    _check_scores(out.detach(), scores)
    return relevance.detach()


def _check_scores(out: torch.Tensor, scores: torch.Tensor) -> None:
    """The hooked forward must compute the scores: otherwise the head found is not the output layer."""
    if not torch.allclose(out, scores, rtol=1e-3, atol=1e-4 * (1 + float(scores.abs().max()))):
        raise StdaError(
            "the model's last linear layer with one output per class is not its output layer, so its "
            "log-odds cannot be explained; explain the raw logit instead (output='logit', --output logit)"
        )


def contrast_matrix(n_classes: int) -> torch.Tensor:
    """``A`` with ``(A @ logits)[k] = logits[k] - mean(other logits)``: for two classes, the log-odds."""
    if n_classes < 2:
        return torch.ones(1, 1)
    a = torch.full((n_classes, n_classes), -1.0 / (n_classes - 1))
    return a.fill_diagonal_(1.0)


@contextlib.contextmanager
def _score_head(model: nn.Module, logits: torch.Tensor, output: str) -> Iterator[torch.Tensor]:
    """Temporarily fold :func:`contrast_matrix` into the final linear layer; yield the scores it computes."""
    if output == "logit":
        yield logits
        return
    head = _output_layer(model, logits.shape[1])
    a = contrast_matrix(logits.shape[1]).to(logits)
    weight, bias = head.weight.data, None if head.bias is None else head.bias.data
    head.weight.data = a @ weight
    if bias is not None:
        head.bias.data = a @ bias
    try:
        yield logits @ a.T
    finally:
        head.weight.data = weight
        if bias is not None:
            head.bias.data = bias


def _output_layer(model: nn.Module, n_classes: int) -> nn.Linear:
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == n_classes]
    if not heads:
        raise StdaError(
            f"the model has no linear layer with {n_classes} outputs to explain log-odds with; "
            "explain the raw logit instead (output='logit', --output logit)"
        )
    return heads[-1]


# ----------------------------------------------------------------------------------------------------------------
# Checks that hold for DTD


def pixel_relevance(relevance: torch.Tensor) -> torch.Tensor:
    """Sum relevance ``(N, C, H, W)`` over channels into one value per pixel ``(N, H, W)``."""
    return relevance.sum(dim=1)


def conservation(expl: Explanation) -> torch.Tensor:
    """Per image, the sum of input relevance over the explained output value (1 when fully conserved).

    For DTD on bias-free layers this is 1 up to the stabiliser; positive biases absorb relevance and lower it.
    """
    total = expl.relevance.flatten(1).sum(dim=1)
    return total / expl.explained.where(expl.explained.abs() > 1e-12, torch.full_like(expl.explained, 1e-12))


def negative_fraction(expl: Explanation) -> torch.Tensor:
    """Per image, the share of relevance mass that is negative (0 for DTD when the explained logit is positive)."""
    flat = expl.relevance.flatten(1)
    mass = flat.abs().sum(dim=1).clamp_min(1e-12)
    return flat.clamp(max=0).abs().sum(dim=1) / mass


def untrained_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """The same architecture with every parameter re-initialised: the reference level of a relevance share.

    Adebayo et al. (2018)'s model-randomisation check: what an explanation method shows for a network that has
    learned nothing. Every module's own ``reset_parameters`` draws the weights (seeded; batch-norm running
    statistics reset too); the copy is in eval mode on the model's device and the model is left untouched.
    """
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        copy = deepcopy(model)
        for module in copy.modules():
            if hasattr(module, "reset_parameters") and module is not copy:
                module.reset_parameters()
    finally:
        torch.random.set_rng_state(state)
    return copy.eval()
