"""LRP composites by name, and the canonizers that make a model fit them.

A composite is one registered :class:`CompositeSpec`: its name, a one-line description and ``build(model, ...)``
returning the zennit composite. :func:`register_composite` adds one (user code or a plugin); plan validation, the CLI
``--composite`` choices and the app's list read :data:`COMPOSITE_REGISTRY`.
"""

from __future__ import annotations

import torch
from torch import nn
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus, LayerMapComposite, layer_map_base
from zennit.core import Composite
from zennit.rules import Epsilon, Gamma
from zennit.types import Convolution

from xaicomp_core.errors import PlanError
from xaicomp_core.registry import Registry, RegistryView, decorator

DEFAULT_COMPOSITE = "epsilon"


class SignStabilizer:
    """``z + eps * sign(z)`` with ``sign(0) = +1``: the same values as zennit's default stabilizer, in fewer passes
    over the tensor (it is applied to every layer output in the backward pass)."""

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = float(epsilon)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        # copysign(eps, +0.0) = +eps as zennit's sign(0) = +1; a -0.0 cannot come out of a conv/linear sum, which
        # starts from +0.0
        out = torch.copysign(torch.tensor(self.epsilon, dtype=z.dtype, device=z.device), z)
        return out.add_(z)


class ExactMergeBatchNorm(SequentialMergeBatchNorm):
    """zennit's SequentialMergeBatchNorm, but the emptied BatchNorm computes exactly the identity.

    zennit sets the merged BatchNorm's running variance to 1, so it still divides by sqrt(1 + eps): outputs then
    differ from the model's by about 5e-6 relative per BatchNorm. Setting the variance to 1 - eps removes that.
    """

    @staticmethod
    def merge_batch_norm(modules, batch_norm):  # noqa: D102
        SequentialMergeBatchNorm.merge_batch_norm(modules, batch_norm)
        batch_norm.running_var.data = torch.full_like(batch_norm.running_var.data, 1.0 - batch_norm.eps)


def canonizers_for(model: nn.Module) -> list:
    """zennit canonizers for ``model``: BatchNorm merging (exact) if the model has BatchNorm, plus routing of the
    residual additions of torchvision-style ResNet blocks through a ``Sum`` layer (zennit's ResNet canonizers)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer

    mods = list(model.modules())
    out: list = []
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods):
        out.append(ExactMergeBatchNorm())
    if any(isinstance(m, (BasicBlock, Bottleneck)) for m in mods):
        out += [ResNetBottleneckCanonizer(), ResNetBasicBlockCanonizer()]
    return out


class CompositeSpec:
    """One named LRP composite.

    Subclasses set ``name`` and ``description`` and implement :meth:`build`. ``epsilon`` and ``stabilizer`` arrive
    as callables (:class:`SignStabilizer`), which zennit accepts wherever it accepts a float.
    """

    name: str = ""
    description: str = ""

    def build(self, model: nn.Module, epsilon: SignStabilizer, stabilizer: SignStabilizer, gamma: float,
              canonizers: list) -> Composite:
        """The zennit composite for ``model``."""
        raise NotImplementedError


COMPOSITE_REGISTRY: Registry[CompositeSpec] = Registry("composite", PlanError)
register_composite = decorator(COMPOSITE_REGISTRY)
#: name -> one-line description (a live view of the registry).
COMPOSITES = RegistryView(COMPOSITE_REGISTRY, lambda c: c.description)


@register_composite
class EpsilonComposite(CompositeSpec):
    """LRP-epsilon everywhere; zennit's base rules (pass-through activations, Norm for sums and average pooling)."""

    name = "epsilon"
    description = "LRP-epsilon on every conv and linear layer (the paper's setting)"

    def build(self, model, epsilon, stabilizer, gamma, canonizers):  # noqa: D102
        layer_map = layer_map_base(stabilizer) + [(Convolution, Epsilon(epsilon=epsilon)),
                                                 (nn.Linear, Epsilon(epsilon=epsilon))]
        return LayerMapComposite(layer_map=layer_map, canonizers=canonizers)


@register_composite
class EpsilonPlusComposite(CompositeSpec):
    """zennit's EpsilonPlus."""

    name = "epsilon-plus"
    description = "LRP-z+ on convs, epsilon on linear layers (Yeom et al.)"

    def build(self, model, epsilon, stabilizer, gamma, canonizers):  # noqa: D102
        return EpsilonPlus(epsilon=epsilon, stabilizer=stabilizer, canonizers=canonizers)


@register_composite
class Alpha2Beta1Composite(CompositeSpec):
    """zennit's EpsilonAlpha2Beta1."""

    name = "alpha2beta1"
    description = "LRP-alpha2-beta1 on convs, epsilon on linear layers"

    def build(self, model, epsilon, stabilizer, gamma, canonizers):  # noqa: D102
        return EpsilonAlpha2Beta1(epsilon=epsilon, stabilizer=stabilizer, canonizers=canonizers)


@register_composite
class EpsilonGammaComposite(CompositeSpec):
    """Gamma on convs, epsilon on linear layers."""

    name = "epsilon-gamma"
    description = "LRP-gamma (0.25) on convs, epsilon on linear layers"

    def build(self, model, epsilon, stabilizer, gamma, canonizers):  # noqa: D102
        layer_map = layer_map_base(stabilizer) + [(Convolution, Gamma(gamma=gamma, stabilizer=stabilizer)),
                                                 (nn.Linear, Epsilon(epsilon))]
        return LayerMapComposite(layer_map=layer_map, canonizers=canonizers)


@register_composite
class EpsilonGammaBoxComposite(CompositeSpec):
    """zennit's EpsilonGammaBox with the bounds of the model's input range."""

    name = "epsilon-gamma-box"
    description = "z-box on the first conv, gamma on other convs, epsilon on linear layers"

    def build(self, model, epsilon, stabilizer, gamma, canonizers):  # noqa: D102
        from xaicomp_core.io.models import model_info

        low, high = model_info(model).preprocessing.bounds()
        return EpsilonGammaBox(low=low, high=high, epsilon=epsilon, gamma=gamma, stabilizer=stabilizer,
                               canonizers=canonizers)


def make_composite(name: str, model: nn.Module, epsilon: float = 1e-6, gamma: float = 0.25,
                   canonizers: list | None = None, stabilizer: float = 1e-6) -> Composite:
    """Build the named zennit composite (see :data:`COMPOSITES`) with canonizers suited to ``model``.

    ``epsilon`` is the epsilon rule's; ``stabilizer`` guards the divisions of the other rules (z+, alpha-beta,
    gamma, and the Norm rule zennit uses for sums and average pooling).
    """
    spec = COMPOSITE_REGISTRY.get(name)
    if canonizers is None:
        canonizers = canonizers_for(model)
    return spec.build(model, SignStabilizer(epsilon), SignStabilizer(stabilizer), gamma, canonizers)
