"""CompressionPlan: what to prune and how many bits each kept weight gets. Versioned, JSON round-trip."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from xaicomp_core.compress.criteria import BIT_RANKINGS, CRITERIA, CRITERION_REGISTRY  # noqa: F401  (public)
from xaicomp_core.compress.levels import FP32, MAX_BITS, MIN_BITS
from xaicomp_core.compress.quantize import QUANTIZER_REGISTRY, QUANTIZERS  # noqa: F401  (public)
from xaicomp_core.errors import PlanError
from xaicomp_core.relevance.composites import COMPOSITE_REGISTRY

PLAN_VERSION = 1
SCOPES = ("global", "per-layer")
GRANULARITIES = ("weight", "channel", "layer")
PROTECT = ("none", "first-last")


@dataclass
class CompressionPlan:
    """A compression plan.

    Parameters
    ----------
    criterion : str
        A registered criterion (see :data:`CRITERIA`; plugins included).
    prune_ratio : float
        Fraction of the prunable weights to remove, in [0, 1) (ignored by ``paper`` and ``lrp-zero``).
    scope : {"global", "per-layer"}
        Rank weights across all layers, or prune/allocate the same fraction in every layer.
    protect : {"none", "first-last"}
        ``first-last`` keeps the first and last layer dense and in fp32.
    bit_levels : list of int
        Bit widths in descending order, each 1-8, or 32 for "keep fp32" (e.g. ``[8, 4, 2]``).
    bit_split : list of float
        Fraction of the kept weights given each level but the last (e.g. ``[0.2, 0.5]``: top 20 % get 8 bits, the
        next 50 % 4 bits, the rest 2 bits). Length ``len(bit_levels) - 1``, sum at most 1.
    bit_ranking : {"criterion", "relevance", "magnitude"}
        What ranks the kept weights for bits: the pruning criterion's score, |relevance| or |weight|.
    granularity : {"weight", "channel", "layer"}
        Bit width chosen per weight (the paper), per output channel or per layer.
    quantizer : {"mse", "absmax"}
        Scale per (output channel, bit class): the one of 16 clipping ratios with least squared error, or max|w|.
    composite : str
        LRP composite the relevance comes from.
    seed : int
        Seed of the ``random`` criterion and of fine-tuning.
    finetune_epochs : int
        Epochs of recovery fine-tuning after compression (0 = none); masks and bit classes stay fixed, quantization
        is in the loop (straight-through estimator), so the size is unchanged.
    finetune_lr : float
        Learning rate of the fine-tuning (SGD, momentum 0.9, cosine decay).
    """

    criterion: str = "lrp"
    prune_ratio: float = 0.0
    scope: str = "global"
    protect: str = "none"
    bit_levels: list[int] = field(default_factory=lambda: [FP32])
    bit_split: list[float] = field(default_factory=list)
    bit_ranking: str = "criterion"
    granularity: str = "weight"
    quantizer: str = "mse"
    composite: str = "epsilon"
    seed: int = 0
    finetune_epochs: int = 0
    finetune_lr: float = 0.01
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        self.bit_levels = [int(b) for b in self.bit_levels]
        self.bit_split = [float(f) for f in self.bit_split]
        self.prune_ratio = float(self.prune_ratio)
        self.finetune_lr = float(self.finetune_lr)

    # ------------------------------------------------------------------------------------------------------------
    @property
    def uses_ratio(self) -> bool:
        """Whether ``prune_ratio`` applies to this criterion."""
        return CRITERION_REGISTRY.get(self.criterion).uses_ratio if self.criterion in CRITERION_REGISTRY else True

    @property
    def quantized(self) -> bool:
        """Whether any level is below fp32."""
        return any(b != FP32 for b in self.bit_levels)

    def validate(self) -> CompressionPlan:
        """Raise :class:`PlanError` with a readable message if anything is out of range; returns ``self``."""
        if self.version > PLAN_VERSION:
            raise PlanError(f"plan version {self.version} is newer than this xaicomp understands ({PLAN_VERSION}); "
                            "upgrade xaicomp")
        if self.version < 1:
            raise PlanError(f"invalid plan version {self.version}")
        CRITERION_REGISTRY.get(self.criterion)  # raises naming the choices
        if not (0.0 <= self.prune_ratio < 1.0) or self.prune_ratio != self.prune_ratio:
            raise PlanError(f"prune ratio must be in [0, 1), got {self.prune_ratio}")
        for name, value, allowed in (("scope", self.scope, SCOPES), ("granularity", self.granularity, GRANULARITIES),
                                     ("bit ranking", self.bit_ranking, BIT_RANKINGS),
                                     ("protect", self.protect, PROTECT),
                                     ("quantizer", self.quantizer, tuple(QUANTIZER_REGISTRY.names())),
                                     ("composite", self.composite, tuple(COMPOSITE_REGISTRY.names()))):
            if value not in allowed:
                raise PlanError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        if not self.bit_levels:
            raise PlanError("at least one bit level is needed")
        bad = [b for b in self.bit_levels if not (MIN_BITS <= b <= MAX_BITS or b == FP32)]
        if bad:
            raise PlanError(f"bit widths must be 1-8 or 32 (fp32), got {bad}")
        if any(a <= b for a, b in zip(self.bit_levels, self.bit_levels[1:])):
            raise PlanError(f"bit levels must be distinct and in descending order, got {self.bit_levels}")
        if len(self.bit_split) != len(self.bit_levels) - 1:
            raise PlanError(f"{len(self.bit_levels)} bit levels need {len(self.bit_levels) - 1} split fraction(s), "
                            f"got {len(self.bit_split)}")
        if any(not (0.0 <= f <= 1.0) or f != f for f in self.bit_split):
            raise PlanError(f"bit split fractions must lie in [0, 1], got {self.bit_split}")
        if not isinstance(self.finetune_epochs, int) or not (0 <= self.finetune_epochs <= 100):
            raise PlanError(f"fine-tuning epochs must be an integer in 0..100, got {self.finetune_epochs}")
        if not (0.0 < self.finetune_lr <= 1.0):
            raise PlanError(f"fine-tuning learning rate must be in (0, 1], got {self.finetune_lr}")
        if sum(self.bit_split) > 1.0 + 1e-9:
            raise PlanError(f"bit split fractions add up to {sum(self.bit_split):.3f}, more than 1 "
                            "(thresholds out of order)")
        return self

    # ------------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (includes ``version``)."""
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressionPlan:
        """Build and validate a plan from a dict; unknown keys or newer versions raise :class:`PlanError`."""
        if not isinstance(d, dict):
            raise PlanError("a plan must be a JSON object")
        version = d.get("version", PLAN_VERSION)
        if not isinstance(version, int):
            raise PlanError(f"invalid plan version {version!r}")
        if version > PLAN_VERSION:
            raise PlanError(f"plan version {version} is newer than this xaicomp understands ({PLAN_VERSION}); "
                            "upgrade xaicomp")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PlanError(f"unknown plan field(s): {', '.join(unknown)}")
        try:
            plan = cls(**d)
        except (TypeError, ValueError) as e:
            raise PlanError(f"invalid plan: {e}") from None
        return plan.validate()

    @classmethod
    def from_json(cls, text: str) -> CompressionPlan:
        """Parse JSON text (see :meth:`from_dict`)."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> CompressionPlan:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def key(self) -> str:
        """Canonical string identifying the plan (for caches)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    # ------------------------------------------------------------------------------------------------------------
    def describe(self) -> str:
        """One-line human summary."""
        crit = CRITERION_REGISTRY.get(self.criterion)
        if not crit.uses_ratio:
            prune = crit.rule_text or f"prune by {crit.name}"
        else:
            prune = f"prune {self.prune_ratio:.0%} by {self.criterion} ({self.scope})"
        levels = ["fp32" if b == FP32 else f"{b}b" for b in self.bit_levels]
        if len(levels) == 1:
            bits = f"all kept weights {levels[0]}"
        else:
            shares = [*self.bit_split, max(0.0, 1 - sum(self.bit_split))]
            bits = " / ".join(f"{s:.0%} {lv}" for s, lv in zip(shares, levels)) + f" per {self.granularity}"
        ft = f"; fine-tuned {self.finetune_epochs} epoch(s)" if self.finetune_epochs else ""
        return f"{prune}; {bits}{ft}"

    def cli_words(self) -> list[str]:
        """The ``xaicomp compress`` options that reproduce this plan, as shell words (numbers written so that they
        parse back exactly; fields at their defaults left out)."""

        def num(x: float) -> str:
            short = f"{x:g}"
            return short if float(short) == x else repr(float(x))

        words = ["--criterion", self.criterion]
        if self.uses_ratio:
            words += ["--prune", num(self.prune_ratio)]
        words += ["--bits", ",".join(str(b) for b in self.bit_levels)]
        if self.bit_split:
            words += ["--split", ",".join(num(f) for f in self.bit_split)]
        defaults = CompressionPlan()
        for name, flag in (("scope", "--scope"), ("granularity", "--granularity"), ("bit_ranking", "--bit-ranking"),
                           ("protect", "--protect"), ("quantizer", "--quantizer"), ("composite", "--composite"),
                           ("seed", "--seed"), ("finetune_epochs", "--finetune-epochs"),
                           ("finetune_lr", "--finetune-lr")):
            value = getattr(self, name)
            if value != getattr(defaults, name):
                words += [flag, num(value) if isinstance(value, float) else str(value)]
        return words

    def cli_args(self) -> str:
        """The ``xaicomp compress`` options that reproduce this plan, as command-line text (:meth:`cli_words` joined
        with :func:`shlex.join`)."""
        import shlex

        return shlex.join(self.cli_words())

    @classmethod
    def uniform(cls, bits: int, **kwargs: Any) -> CompressionPlan:
        """Every kept weight at ``bits`` (baseline)."""
        return cls(bit_levels=[bits], bit_split=[], **kwargs)
