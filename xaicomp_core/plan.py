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

#: Version 2 added the per-layer fields ``layer_prune`` and ``layer_bits``, version 3 ``fold_norm``, version 4
#: ``finetune_batch``; a plan is written with the lowest version that holds it (a plan without them as version 1,
#: readable by every xaicomp), and older plans keep loading.
PLAN_VERSION = 4
#: The fine-tuning batch size of every plan that does not name one (all plans before version 4 fine-tuned so), and
#: the default learning rate.
DEFAULT_FINETUNE_BATCH = 128
DEFAULT_FINETUNE_LR = 0.01
#: Longest plan JSON read (a plan is a few hundred characters).
MAX_PLAN_CHARS = 1_000_000
SCOPES = ("global", "per-layer")
GRANULARITIES = ("weight", "channel", "layer")
PROTECT = ("none", "first-last")


def _per_layer_problem(name: str, value: Any, kind: str) -> str | None:
    """Why a per-layer mapping (layer name -> prune ratio or bit width) is invalid (None if it is fine)."""
    import numbers

    if not isinstance(value, dict):
        return f"{name} must map layer names to values (a JSON object), got {type(value).__name__}"
    for layer, v in value.items():
        if not isinstance(layer, str) or not layer or any(c in layer for c in "=, "):
            return f"{name}: invalid layer name {layer!r}"
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            return f"{name}[{layer!r}] must be a number, got {v!r}"
        if kind == "ratio" and not (0.0 <= float(v) < 1.0):
            return f"{name}[{layer!r}]: prune ratio must be in [0, 1), got {v}"
        if kind == "bits" and (not isinstance(v, numbers.Integral) or not (MIN_BITS <= v <= MAX_BITS or v == FP32)):
            return f"{name}[{layer!r}]: bit width must be an integer 1-8 or 32 (fp32), got {v}"
    return None


_STR_FIELDS = ("criterion", "scope", "protect", "bit_ranking", "granularity", "quantizer", "composite")
_INT_FIELDS = ("seed", "finetune_epochs", "finetune_batch", "version")
_REAL_FIELDS = ("prune_ratio", "finetune_lr")


def _integral(x: Any) -> bool:
    """An integer of any integer type (Python, numpy), not a bool."""
    import numbers

    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _real(x: Any) -> bool:
    """A real number that is not a bool or a string."""
    import numbers

    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _short_repr(x: Any, limit: int = 40) -> str:
    r = repr(x)
    return r if len(r) <= limit else r[:limit] + "…"


def _check_field_types(d: dict[str, Any]) -> None:
    """Strict JSON types: strings are strings, integers are integers (not true/false, not 8.0), lists are lists."""
    for name in _STR_FIELDS:
        if name in d and not isinstance(d[name], str):
            raise PlanError(f"plan field {name!r} must be a string, got {_short_repr(d[name])}")
    for name in _INT_FIELDS:
        if name in d and (not isinstance(d[name], int) or isinstance(d[name], bool)):
            raise PlanError(f"plan field {name!r} must be an integer, got {_short_repr(d[name])}")
    for name in _REAL_FIELDS:
        if name in d and not _real(d[name]):
            raise PlanError(f"plan field {name!r} must be a number, got {_short_repr(d[name])}")
    if "fold_norm" in d and not isinstance(d["fold_norm"], bool):
        raise PlanError(f"plan field 'fold_norm' must be true or false, got {_short_repr(d['fold_norm'])}")
    if "bit_levels" in d:
        v = d["bit_levels"]
        if not isinstance(v, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in v):
            raise PlanError(f"plan field 'bit_levels' must be a list of integers (e.g. [8, 4, 2]), got "
                            f"{_short_repr(v)}")
    if "bit_split" in d:
        v = d["bit_split"]
        if not isinstance(v, list) or not all(_real(f) for f in v):
            raise PlanError(f"plan field 'bit_split' must be a list of numbers (e.g. [0.2, 0.5]), got "
                            f"{_short_repr(v)}")


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
        is in the loop (straight-through estimator), so only the values section's size can change (its Huffman
        code follows the fine-tuned codes).
    finetune_lr : float
        Learning rate of the fine-tuning (SGD, momentum 0.9, cosine decay).
    finetune_batch : int
        Images per fine-tuning step (default 128, the batch of every plan before version 4; plans with another one
        are written as version 4). Smaller batches take more, noisier steps in the same epochs: ``xaicomp auto``
        fine-tunes with 32 at a learning rate of 0.005, which recovered more accuracy on held-out images.
    layer_prune : dict of str to float
        Per-layer prune ratios by layer (module) name, e.g. ``{"features.0": 0.3, "classifier.1": 0.95}``: each named
        layer loses exactly that fraction, the criterion choosing which weights inside it; the other layers share
        ``prune_ratio`` as ``scope`` says. Needs a criterion with a prune ratio (not a rule, not structured).
    layer_bits : dict of str to int
        Per-layer bit width by layer name: every kept weight of a named layer gets it (each must be one of
        ``bit_levels``); the other layers are allocated by ``bit_split`` as usual. Plans with per-layer fields are
        written as version 2.
    fold_norm : bool
        Store every BatchNorm as one scale and one shift per channel (``weight / sqrt(running_var + eps)`` and
        ``bias - running_mean * scale``) with a zero mean and a constant variance of ``1 - eps``, which the packed
        format stores as one number each: 8 bytes per channel instead of 16. The model keeps its architecture;
        its outputs change by float32 rounding only, and the plan's evaluation measures the folded model. Plans
        with it are written as version 3.
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
    finetune_lr: float = DEFAULT_FINETUNE_LR
    finetune_batch: int = DEFAULT_FINETUNE_BATCH
    layer_prune: dict[str, float] = field(default_factory=dict)
    layer_bits: dict[str, int] = field(default_factory=dict)
    fold_norm: bool = False
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        import numbers

        for name, cast in (("layer_prune", float), ("layer_bits", int)):
            value = getattr(self, name)
            if isinstance(value, dict):  # numpy numbers become plain ones; anything else is left for validate()
                ok = numbers.Integral if cast is int else numbers.Real
                setattr(self, name, {k: cast(v) if isinstance(v, ok) and not isinstance(v, bool) else v
                                     for k, v in value.items()})
        # the version a plan is written with is the lowest that can hold it
        if isinstance(self.version, int) and 1 <= self.version <= PLAN_VERSION:
            self.version = self.needed_version()
        # numbers of other numeric types (numpy, integral floats) become plain int/float; anything else stays as it
        # is, so that validate() names it instead of a silent coercion ("842" -> [8, 4, 2], 8.9 -> 8)
        if isinstance(self.bit_levels, (list, tuple)):
            self.bit_levels = [int(b) if _integral(b) else b for b in self.bit_levels]
        if isinstance(self.bit_split, (list, tuple)):
            self.bit_split = [float(f) if _real(f) else f for f in self.bit_split]
        for name in ("prune_ratio", "finetune_lr"):
            if _real(getattr(self, name)):
                setattr(self, name, float(getattr(self, name)))
        for name in ("seed", "finetune_epochs", "finetune_batch", "version"):
            if _integral(getattr(self, name)):
                setattr(self, name, int(getattr(self, name)))

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
        """Raise :class:`PlanError` with a readable message if anything is mistyped or out of range; returns
        ``self``."""
        self._check_types()
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
        if not 0 <= self.seed < 2**32:
            raise PlanError(f"seed must be an integer in 0..{2**32 - 1}, got {self.seed}")
        if not isinstance(self.finetune_epochs, int) or not (0 <= self.finetune_epochs <= 100):
            raise PlanError(f"fine-tuning epochs must be an integer in 0..100, got {self.finetune_epochs}")
        if not (0.0 < self.finetune_lr <= 1.0):
            raise PlanError(f"fine-tuning learning rate must be in (0, 1], got {self.finetune_lr}")
        if not 1 <= self.finetune_batch <= 4096:
            raise PlanError(f"fine-tuning batch size must be an integer in 1..4096, got {self.finetune_batch}")
        self._validate_layers()
        if sum(self.bit_split) > 1.0 + 1e-9:
            raise PlanError(f"bit split fractions add up to {sum(self.bit_split):.3f}, more than 1 "
                            "(thresholds out of order)")
        return self

    def _check_types(self) -> None:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["bit_levels"] = list(d["bit_levels"]) if isinstance(d["bit_levels"], (list, tuple)) else d["bit_levels"]
        d["bit_split"] = list(d["bit_split"]) if isinstance(d["bit_split"], (list, tuple)) else d["bit_split"]
        _check_field_types(d)
        if isinstance(self.bit_levels, tuple):
            self.bit_levels = list(self.bit_levels)
        if isinstance(self.bit_split, tuple):
            self.bit_split = list(self.bit_split)

    # ------------------------------------------------------------------------------------------------------------
    def needed_version(self) -> int:
        """The lowest plan version that holds this plan: 4 with a ``finetune_batch`` other than the default, 3 with
        ``fold_norm``, 2 with per-layer fields, else 1."""
        if self.finetune_batch != DEFAULT_FINETUNE_BATCH:
            return 4
        if self.fold_norm is True:
            return 3
        return 2 if (self.layer_prune or self.layer_bits) else 1

    def _validate_layers(self) -> None:
        for name, kind in (("layer_prune", "ratio"), ("layer_bits", "bits")):
            problem = _per_layer_problem(name, getattr(self, name), kind)
            if problem:
                raise PlanError(problem)
        if self.layer_prune:
            crit = CRITERION_REGISTRY.get(self.criterion)
            if not crit.uses_ratio or crit.structured:
                raise PlanError(f"per-layer prune ratios need a criterion with a prune ratio; {self.criterion!r} "
                                f"{'decides by a rule' if not crit.uses_ratio else 'removes whole channels'}")
        missing = sorted({b for b in self.layer_bits.values()} - set(self.bit_levels))
        if missing:
            raise PlanError(f"layer_bits uses bit width(s) {missing} that are not among bit_levels {self.bit_levels}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (includes ``version``; the per-layer fields, ``fold_norm`` and ``finetune_batch``
        only when used, and then version 2, 3 or 4)."""
        d = asdict(self)
        for name in ("layer_prune", "layer_bits", "fold_norm"):
            if d[name] in ({}, False):
                del d[name]
        if d["finetune_batch"] == DEFAULT_FINETUNE_BATCH:
            del d["finetune_batch"]
        if self.version <= PLAN_VERSION:
            d["version"] = self.needed_version()
        return d

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressionPlan:
        """Build and validate a plan from a dict; unknown keys or newer versions raise :class:`PlanError`."""
        if not isinstance(d, dict):
            raise PlanError("a plan must be a JSON object")
        version = d.get("version", PLAN_VERSION)
        if not isinstance(version, int) or isinstance(version, bool):
            raise PlanError(f"invalid plan version {_short_repr(version)} (an integer is needed)")
        if version > PLAN_VERSION:
            raise PlanError(f"plan version {version} is newer than this xaicomp understands ({PLAN_VERSION}); "
                            "upgrade xaicomp")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PlanError(f"unknown plan field(s): {', '.join(map(str, unknown))}")
        _check_field_types(d)
        try:
            plan = cls(**d)
        except (TypeError, ValueError) as e:
            raise PlanError(f"invalid plan: {e}") from None
        return plan.validate()

    @classmethod
    def from_json(cls, text: str) -> CompressionPlan:
        """Parse JSON text (see :meth:`from_dict`)."""
        if not isinstance(text, str):
            raise PlanError("a plan must be JSON text")
        if len(text) > MAX_PLAN_CHARS:
            raise PlanError(f"a plan of {len(text):,} characters is too long (at most {MAX_PLAN_CHARS:,})")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON ({e.msg} at line {e.lineno})") from None
        except RecursionError:
            raise PlanError("plan JSON is nested too deeply") from None
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
        if self.layer_prune:
            prune += "; per layer " + ", ".join(f"{k} {v:.0%}" for k, v in self.layer_prune.items())
        if self.layer_bits:
            bits += "; per layer " + ", ".join(f"{k} {'fp32' if v == FP32 else f'{v}b'}"
                                               for k, v in self.layer_bits.items())
        ft = f"; fine-tuned {self.finetune_epochs} epoch(s)" if self.finetune_epochs else ""
        if self.finetune_epochs and (self.finetune_batch != DEFAULT_FINETUNE_BATCH
                                     or self.finetune_lr != DEFAULT_FINETUNE_LR):
            ft += f" (batch {self.finetune_batch}, learning rate {self.finetune_lr:g})"
        norm = "; BatchNorm stored as scale and shift" if self.fold_norm else ""
        return f"{prune}; {bits}{ft}{norm}"

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
                           ("finetune_lr", "--finetune-lr"), ("finetune_batch", "--finetune-batch")):
            value = getattr(self, name)
            if value != getattr(defaults, name):
                words += [flag, num(value) if isinstance(value, float) else str(value)]
        if self.layer_prune:
            words += ["--layer-prune", ",".join(f"{k}={num(v)}" for k, v in self.layer_prune.items())]
        if self.layer_bits:
            words += ["--layer-bits", ",".join(f"{k}={v}" for k, v in self.layer_bits.items())]
        if self.fold_norm:
            words += ["--fold-norm"]
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
