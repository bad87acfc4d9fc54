"""Where the model and the images come from, resolved one way for the app, the CLI, the report and the export.

* :class:`ModelSource` -- a built-in trained model, a torchvision architecture (pretrained, or with random weights)
  or an architecture plus a weights file (a path, or the bytes of an upload);
* :class:`DataSource` -- the shipped Fashion-MNIST, an ImageFolder directory or ``.zip`` (a path, or the bytes of an
  upload) or a torchvision data set folder already on disk, with the number of evaluation and reference images and
  optional explicit reference / fine-tuning data;
* :func:`resolve_data` -- *the* split policy: which images are the LRP reference, which the evaluation set and which
  the fine-tuning set. Reference and evaluation images never overlap;
* :class:`Sources` -- both together: loads them, builds the :class:`~xaicomp_core.CompressionSession` and renders
  the equivalent ``xaicomp`` command as a :class:`CliCommand` (shell words joined with :func:`shlex.join`, so quoted
  paths stay whole). Uploaded bytes are rendered as a placeholder path the user replaces
  (:data:`WEIGHTS_PLACEHOLDER`, :data:`DATA_PLACEHOLDER`).

The CLI builds its :class:`Sources` from its options; the app builds one from its sidebar; the rendered command
parses back (with the CLI's parser) to the same sources and plan.
"""

from __future__ import annotations

import os
import pathlib
import shlex
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from xaicomp_core.errors import DataError, WeightsError, XaicompError
from xaicomp_core.evaluate.session import CompressionSession
from xaicomp_core.io.data import (
    BUILTIN_DATASETS,
    ImageDataset,
    load_builtin_dataset,
    load_image_folder,
    load_image_zip,
    load_torchvision_folder,
    split_reference_eval,
    split_reference_train,
)
from xaicomp_core.io.fit import check_class_count
from xaicomp_core.io.models import BUILTIN_MODELS, DEFAULT_MODEL, load_model, load_torchvision_model, model_info
from xaicomp_core.io.onnx_import import ONNX_ARCH, InputSpec, is_onnx_name
from xaicomp_core.io.user_code import is_python_spec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from xaicomp_core.io.models import ModelInfo
    from xaicomp_core.plan import CompressionPlan

DEFAULT_DATA = "fashion-mnist"
DEFAULT_REFERENCE_SAMPLES = 1000
DEFAULT_TARGET = "true"
DEFAULT_EPSILON = 1e-6
#: Reference and fine-tuning images taken from the training split of a torchvision folder (balanced, disjoint).
FOLDER_REFERENCE_IMAGES = 1000
FOLDER_TRAIN_IMAGES = 5000
#: Outputs of a torchvision architecture built with random weights without trying a download (the data sets this
#: tool reads have 10 classes).
RANDOM_MODEL_CLASSES = 10
#: What a rendered command shows in place of uploaded bytes (the user replaces it with their file).
WEIGHTS_PLACEHOLDER = "YOUR_WEIGHTS_FILE"
ONNX_PLACEHOLDER = "YOUR_MODEL.onnx"
DATA_PLACEHOLDER = "YOUR_DATA"
DATA_KINDS = ("builtin", "images", "torchvision")

ProgressFn = Callable[[int, int], None]


def _num(x: float) -> str:
    """A number as a command-line word that parses back to exactly ``x`` (short when that is exact)."""
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


# ----------------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSource:
    """Which model to load.

    Parameters
    ----------
    arch : str
        A built-in model (``fashion-vgg``...; trained weights shipped) or a torchvision architecture name.
    weights : str, path or bytes, optional
        A ``.safetensors`` / ``.pt`` / ``.pth`` state dict for ``arch``: a path, or the bytes of an upload.
    weights_name : str
        File name of uploaded ``weights`` bytes (error messages, type detection).
    random_weights : bool
        For a torchvision ``arch`` without ``weights``: random weights are acceptable (when ``download`` is set,
        only if the pretrained ones cannot be downloaded).
    download : bool
        For a torchvision ``arch`` without ``weights``: try to get the pretrained ImageNet weights. Without it
        nothing is downloaded, and ``random_weights`` gives a randomly initialised 10-class model (what the app
        offers).

    declared : InputSpec, optional
        For an ONNX file or a Python factory: the declared input size, mean/std, pixel range and class names.

    An ONNX model is ``arch`` = the ``.onnx`` path (or ``arch="onnx"`` with the file's bytes as ``weights`` and its
    name as ``weights_name``); a Python factory is ``arch`` = ``"path/file.py:factory"`` (running that file is the
    caller's explicit choice) with optional ``weights``.

    ``random_weights`` and ``download`` only matter for a torchvision architecture without weights; elsewhere they
    are normalised to their defaults, so equal models compare equal.
    """

    arch: str = DEFAULT_MODEL
    weights: str | bytes | None = None
    weights_name: str = ""
    random_weights: bool = False
    download: bool = True
    declared: InputSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.weights, os.PathLike):
            object.__setattr__(self, "weights", os.fspath(self.weights))
        if self.kind != "torchvision":
            object.__setattr__(self, "random_weights", False)
            object.__setattr__(self, "download", True)

    @property
    def kind(self) -> str:
        """``"onnx"``, ``"python"``, ``"weights"`` (architecture + weights file), ``"builtin"`` or
        ``"torchvision"``."""
        if is_onnx_name(self.arch) or (self.arch == ONNX_ARCH and self.weights is not None):
            return "onnx"
        if is_python_spec(self.arch):
            return "python"
        if self.weights is not None:
            return "weights"
        return "builtin" if self.arch in BUILTIN_MODELS else "torchvision"

    def load(self) -> nn.Module:
        """The model, in eval mode with its ``xaicomp_info`` (see :func:`~xaicomp_core.io.models.load_model`).

        Raises
        ------
        WeightsError
            For an unknown architecture, unreadable or unfitting weights, or pretrained weights that cannot (or may
            not) be downloaded when random ones were not asked for.
        """
        if self.kind in ("onnx", "python"):
            return load_model(self.arch, weights=self.weights, weights_name=self.weights_name or None,
                              declared=self.declared)
        if isinstance(self.weights, bytes):
            return load_model(self.arch, weights=self.weights, weights_name=self.weights_name or "uploaded weights")
        if self.weights is not None:
            return load_model(self.arch, weights=self.weights)
        if self.kind == "builtin":
            return load_model(self.arch)
        if not self.download:
            if not self.random_weights:
                raise WeightsError(f"{self.arch}: pretrained weights would need a download; give a weights file or "
                                   "ask for random weights")
            return load_torchvision_model(self.arch, pretrained=False, allow_random=True,
                                          num_classes=RANDOM_MODEL_CLASSES)
        return load_model(self.arch, allow_random=self.random_weights)

    def cli_words(self) -> list[str]:
        """The ``xaicomp`` options choosing this model (uploaded bytes as :data:`WEIGHTS_PLACEHOLDER`)."""
        declared = [] if self.declared is None else self.declared.cli_words()
        if self.kind == "onnx":
            path = self.arch if self.weights is None else (
                self.weights if isinstance(self.weights, str) else ONNX_PLACEHOLDER)
            return ["--model", path, *declared]
        if self.kind == "python":
            weights = [] if self.weights is None else [
                "--weights", self.weights if isinstance(self.weights, str) else WEIGHTS_PLACEHOLDER]
            return ["--model-py", self.arch, *weights, *declared]
        if self.weights is not None:
            path = self.weights if isinstance(self.weights, str) else WEIGHTS_PLACEHOLDER
            return ["--arch", self.arch, "--weights", path]
        if self.kind == "builtin":
            return ["--model", self.arch]
        return ["--arch", self.arch, *(["--random-weights"] if self.random_weights else []),
                *([] if self.download else ["--no-download"])]

    @classmethod
    def from_info(cls, info: ModelInfo) -> ModelSource:
        """The source of a loaded model, as far as its :class:`~xaicomp_core.io.models.ModelInfo` tells: a built-in
        model by name, random weights as such, anything else as ``arch`` plus a weights file to fill in."""
        if info.source in ("onnx", "python code"):
            card = info.card.get("onnx") or info.card.get("python") or {}
            declared = InputSpec.from_dict(card.get("declared") or {}, "the model") if card.get("declared") else None
            if info.source == "onnx":
                return cls(str(card.get("path") or ONNX_PLACEHOLDER), declared=declared)
            return cls(info.arch.removeprefix("python:"), weights=WEIGHTS_PLACEHOLDER, declared=declared)
        if info.source == "builtin":
            return cls(info.name)
        if info.source == "random":
            return cls(info.arch, random_weights=True)
        if info.source == "pretrained":
            return cls(info.arch)
        return cls(info.arch, weights=WEIGHTS_PLACEHOLDER)


# ----------------------------------------------------------------------------------------------------------------
# the data
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSource:
    """Which images to use (see :func:`resolve_data` for how they are split).

    Parameters
    ----------
    kind : {"builtin", "images", "torchvision"}
        The shipped data set ``name``; an ImageFolder directory or ``.zip`` (``path``, or the bytes ``data`` of an
        upload called ``name``); a torchvision data set ``name`` (``mnist``, ``fashion-mnist``, ``cifar10``) under
        the folder ``path`` (the ``root`` given to torchvision).
    name, path, data
        As above.
    eval_samples : int, optional
        Use only this many evaluation images (class-balanced); None: all.
    reference_samples : int, optional
        LRP reference images (class-balanced); None: all the reference images the split gives.
    reference, train : DataSource, optional
        Explicit reference (relevance) and fine-tuning data instead of what the split policy takes.
    """

    kind: str = "builtin"
    name: str = DEFAULT_DATA
    path: str = ""
    data: bytes | None = field(default=None, repr=False)
    eval_samples: int | None = None
    reference_samples: int | None = DEFAULT_REFERENCE_SAMPLES
    reference: DataSource | None = None
    train: DataSource | None = None

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise DataError(f"unknown data source {self.kind!r}; choose one of {', '.join(DATA_KINDS)}")
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))

    @classmethod
    def parse(cls, spec: str, **kwargs: Any) -> DataSource:
        """A source from the CLI's data form: a built-in name (``fashion-mnist``), ``torchvision:NAME:ROOT``, or the
        path of an ImageFolder directory or ``.zip``. ``kwargs`` set the other fields."""
        spec = str(spec)
        if spec in BUILTIN_DATASETS:
            return cls("builtin", spec, **kwargs)
        if spec.startswith("torchvision:"):
            parts = spec.split(":", 2)
            if len(parts) != 3 or not parts[1] or not parts[2]:
                raise XaicompError("use --data torchvision:NAME:ROOT, e.g. torchvision:fashion-mnist:/data")
            return cls("torchvision", parts[1], parts[2], **kwargs)
        return cls("images", pathlib.Path(spec).name or spec, spec, **kwargs)

    def spec(self) -> str:
        """The CLI's form of this data (see :meth:`parse`); uploaded bytes as :data:`DATA_PLACEHOLDER`."""
        if self.kind == "builtin":
            return self.name
        if self.kind == "torchvision":
            return f"torchvision:{self.name}:{self.path}"
        return DATA_PLACEHOLDER if self.data is not None else self.path

    def cli_words(self) -> list[str]:
        """The ``xaicomp`` options choosing this data (defaults left out)."""
        words: list[str] = []
        if self.spec() != DEFAULT_DATA:
            words += ["--data", self.spec()]
        if self.reference is not None:
            words += ["--reference-data", self.reference.spec()]
        if self.train is not None:
            words += ["--train-data", self.train.spec()]
        if self.reference_samples is not None and self.reference_samples != DEFAULT_REFERENCE_SAMPLES:
            words += ["--reference-samples", str(self.reference_samples)]
        if self.eval_samples is not None:
            words += ["--eval-samples", str(self.eval_samples)]
        return words

    def record(self) -> dict[str, Any] | None:
        """How the evaluation images can be loaded again by name (recorded in packed files, read back by
        :meth:`from_record`); None for uploaded bytes."""
        if self.data is not None:
            return None
        d: dict[str, Any] = {"data": self.spec(), "eval_samples": self.eval_samples}
        if self.reference is not None and self.reference.data is None:
            d["reference_data"] = self.reference.spec()  # an ImageFolder is split only without explicit reference
        return d

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> DataSource:
        """Inverse of :meth:`record`."""
        n = d.get("eval_samples")
        ref = d.get("reference_data")
        return cls.parse(str(d["data"]), eval_samples=None if n is None else int(n),
                         reference=None if not ref else cls.parse(str(ref)))

    def _same_images(self, other: DataSource | None) -> bool:
        return other is not None and other.kind == self.kind == "images" and \
            (other.path, other.data) == (self.path, self.data)


class DataSplits(NamedTuple):
    """The images of one :class:`DataSource`: LRP reference, evaluation and fine-tuning (None: no fine-tuning)."""

    reference: ImageDataset
    evaluation: ImageDataset
    train: ImageDataset | None


def _load_images(source: DataSource, size: tuple[int, int], channels: int, names: list[str]) -> ImageDataset:
    if source.data is not None:
        return load_image_zip(source.data, source.name or "upload.zip", size, channels, names)
    return load_image_folder(source.path, image_size=size, channels=channels, class_names=names)


def _load_whole(source: DataSource, role: str, size: tuple[int, int], channels: int,
                names: list[str]) -> ImageDataset:
    """Explicit reference or fine-tuning data (``role``): that split of a built-in set, the training split of a
    torchvision folder, or a whole ImageFolder."""
    if source.kind == "builtin":
        return load_builtin_dataset(source.name, role)
    if source.kind == "torchvision":
        return load_torchvision_folder(source.path, source.name, train=True)
    return _load_images(source, size, channels, names)


def reference_subset(reference: ImageDataset, n: int | None) -> ImageDataset:
    """The ``n`` reference images relevance is computed on: a seeded class-balanced subset (all for None, or if
    there are no more; fewer than one is left to the session to refuse)."""
    if n is None or n < 1:
        return reference
    return reference.balanced_subset(n)


def _split(source: DataSource, image_size: Sequence[int], channels: int, class_names: Sequence[str],
           evaluation_only: bool) -> tuple[ImageDataset | None, ImageDataset, ImageDataset | None]:
    size, names = (int(image_size[0]), int(image_size[1])), list(class_names)
    if source.eval_samples is not None and source.eval_samples < 1:
        raise DataError("the number of evaluation images must be at least 1")
    explicit_ref = None if source._same_images(source.reference) else source.reference
    explicit_train = None if source._same_images(source.train) else source.train
    ref: ImageDataset | None = None
    train: ImageDataset | None = None
    if source.kind == "builtin":
        ev = load_builtin_dataset(source.name, "eval")
        if not evaluation_only:
            ref = load_builtin_dataset(source.name, "reference") if explicit_ref is None else None
            train = load_builtin_dataset(source.name, "train") if explicit_train is None else None
    elif source.kind == "images":
        ds = _load_images(source, size, channels, names)
        if explicit_ref is None:
            ref, ev = split_reference_eval(ds, len(ds) if source.eval_samples is None else source.eval_samples)
            if source.train is not None and explicit_train is None:
                train = ref  # the same images as the data: fine-tune on the reference half, never on evaluation
        else:
            ev = ds
    else:
        ev = load_torchvision_folder(source.path, source.name, train=False)
        if not evaluation_only and (explicit_ref is None or explicit_train is None):
            pool = load_torchvision_folder(source.path, source.name, train=True)
            ref, train = split_reference_train(pool, FOLDER_REFERENCE_IMAGES, FOLDER_TRAIN_IMAGES)
    if not evaluation_only:
        if explicit_ref is not None:
            ref = _load_whole(explicit_ref, "reference", size, channels, names)
        if explicit_train is not None:
            train = _load_whole(explicit_train, "train", size, channels, names)
    if source.eval_samples is not None:
        ev = ev.balanced_subset(source.eval_samples)
    return ref, ev, train


def resolve_data(source: DataSource, image_size: Sequence[int], channels: int,
                 class_names: Sequence[str]) -> DataSplits:
    """The reference, evaluation and fine-tuning images of ``source`` for a model's preprocessing: the one split
    policy of the app and the CLI.

    * built-in data: its shipped ``reference``, ``eval`` and ``train`` splits (disjoint by construction);
    * an ImageFolder directory or zip: disjoint class-balanced halves
      (:func:`~xaicomp_core.io.data.split_reference_eval`), the reference half for relevance and the other half,
      cut to ``eval_samples``, for evaluation; no fine-tuning data;
    * a torchvision folder: evaluation from its test split; reference (:data:`FOLDER_REFERENCE_IMAGES`) and
      fine-tuning (:data:`FOLDER_TRAIN_IMAGES`) images, disjoint, from its training split
      (:func:`~xaicomp_core.io.data.split_reference_train`).

    Explicit ``reference`` / ``train`` data replace what the policy takes (an ImageFolder is then evaluated whole);
    naming the data's own ImageFolder there changes nothing, so the evaluation images are never the reference.
    The evaluation set is cut to a class-balanced ``eval_samples`` and the reference to ``reference_samples``
    (:func:`reference_subset`).

    Parameters
    ----------
    source : DataSource
    image_size : (int, int)
        (height, width) ImageFolder images are decoded to.
    channels : int
        1 or 3.
    class_names : sequence of str
        The model's classes (ImageFolder folders are mapped onto them).

    Returns
    -------
    DataSplits
    """
    ref, ev, train = _split(source, image_size, channels, class_names, evaluation_only=False)
    assert ref is not None
    return DataSplits(reference_subset(ref, source.reference_samples), ev, train)


def evaluation_data(source: DataSource, image_size: Sequence[int], channels: int,
                    class_names: Sequence[str]) -> ImageDataset:
    """Only the evaluation images of :func:`resolve_data` (without loading reference or fine-tuning data where
    they are separate files)."""
    return _split(source, image_size, channels, class_names, evaluation_only=True)[1]


# ----------------------------------------------------------------------------------------------------------------
# command lines
# ----------------------------------------------------------------------------------------------------------------
#: The subcommands' own options (beyond model, data and plan): flag -> number of values (-1: any number).
SUBCOMMAND_OPTIONS: dict[str, dict[str, int]] = {
    "compress": {"--tensors": 0},
    "sweep": {"--criteria": 1, "--ratios": 1, "--bit-settings": -1},
    "export": {"--codec": 1, "--dense": 1, "--onnx": 1},
    "report": {"--criteria": 1, "--ratios": 1, "--heatmaps": 1, "--codec": 1},
}
OUTPUT_FLAGS = ("-o", "--output")


class CliCommand(str):
    """An ``xaicomp`` command line: the text (shell words joined with :func:`shlex.join`, so a quoted path stays
    one word) that also keeps its parts, so that the same model, data and plan can be rendered for another
    subcommand (:meth:`to`) without re-reading shell text.

    Parameters
    ----------
    subcommand : str
        ``compress``, ``export``, ``report``, ...
    words : sequence of str
        The model, data and plan options (shared by the subcommands that load a model).
    options : sequence of tuple of str
        The subcommand's own options, each ``(flag, *values)`` (see :data:`SUBCOMMAND_OPTIONS`).
    output : str, optional
        The ``-o`` file.
    """

    subcommand: str
    words: tuple[str, ...]
    options: tuple[tuple[str, ...], ...]
    output: str | None

    def __new__(cls, subcommand: str, words: Iterable[str] = (), options: Iterable[Sequence[str]] = (),
                output: str | os.PathLike | None = None) -> CliCommand:
        words = tuple(str(w) for w in words)
        options = tuple(tuple(str(p) for p in o) for o in options)
        output = None if output is None else os.fspath(output)
        argv = [subcommand, *words, *(w for o in options for w in o), *([] if output is None else ["-o", output])]
        self = super().__new__(cls, shlex.join(["xaicomp", *argv]))
        self.subcommand, self.words, self.options, self.output = subcommand, words, options, output
        self._argv = tuple(argv)
        return self

    def __getnewargs__(self) -> tuple[Any, ...]:  # type: ignore[override]
        return self.subcommand, self.words, self.options, self.output

    @property
    def argv(self) -> list[str]:
        """The words after ``xaicomp`` (what the CLI's parser reads)."""
        return list(self._argv)

    def to(self, subcommand: str, output: str | os.PathLike | None = None,
           options: Iterable[Sequence[str]] = ()) -> CliCommand:
        """The same model, data and plan for ``subcommand``: own options it accepts are kept, ``options`` added
        (replacing the same flags), ``output`` the new ``-o``."""
        extra = [tuple(o) for o in options]
        given = {o[0] for o in extra}
        accepted = SUBCOMMAND_OPTIONS.get(subcommand, {})
        kept = [o for o in self.options if o[0] in accepted and o[0] not in given]
        return CliCommand(subcommand, self.words, [*kept, *extra], output)

    @classmethod
    def parse(cls, text: str) -> CliCommand:
        """Read command text (``xaicomp SUBCOMMAND ...``) back into its parts: the subcommand's own options
        (:data:`SUBCOMMAND_OPTIONS`, also in ``--flag=value`` form) and ``-o`` are picked out, every other word is
        kept in order."""
        words = shlex.split(text)
        if words[:1] == ["xaicomp"]:
            words = words[1:]
        if not words:
            raise XaicompError(f"not an xaicomp command: {text!r}")
        sub, rest = words[0], words[1:]
        own = SUBCOMMAND_OPTIONS.get(sub, {})
        common: list[str] = []
        options: list[tuple[str, ...]] = []
        output: str | None = None
        i = 0
        while i < len(rest):
            word = rest[i]
            flag, eq, value = word.partition("=") if word.startswith("--") else (word, "", "")
            i += 1
            if flag in OUTPUT_FLAGS:
                if eq:
                    output = value
                elif i < len(rest):
                    output, i = rest[i], i + 1
            elif flag in own:
                if eq:
                    options.append((flag, value))
                    continue
                n = own[flag]
                values: list[str] = []
                while i < len(rest) and (len(values) < n or (n < 0 and not rest[i].startswith("-"))):
                    values.append(rest[i])
                    i += 1
                options.append((flag, *values))
            else:
                common.append(word)
        return cls(sub, common, options, output)


# ----------------------------------------------------------------------------------------------------------------
# model and data together
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sources:
    """A model source, a data source and the relevance settings that go with them.

    Parameters
    ----------
    model : ModelSource
    data : DataSource
    target : {"true", "predicted"}
        The class whose relevance starts LRP.
    epsilon : float
        Epsilon of the epsilon rule.
    """

    model: ModelSource = field(default_factory=ModelSource)
    data: DataSource = field(default_factory=DataSource)
    target: str = DEFAULT_TARGET
    epsilon: float = DEFAULT_EPSILON

    def load_model(self) -> nn.Module:
        """The model (:meth:`ModelSource.load`)."""
        return self.model.load()

    def load_data(self, info: ModelInfo) -> DataSplits:
        """The reference, evaluation and fine-tuning images for the model described by ``info``
        (:func:`resolve_data`)."""
        pre = info.preprocessing
        splits = resolve_data(self.data, pre.input_size, pre.channels, info.class_names)
        check_class_count(info, splits.evaluation, "the evaluation data")
        check_class_count(info, splits.reference, "the reference data")
        if splits.train is not None:
            check_class_count(info, splits.train, "the fine-tuning data")
        return splits

    def evaluation_data(self, info: ModelInfo) -> ImageDataset:
        """Only the evaluation images (:func:`evaluation_data`)."""
        pre = info.preprocessing
        ev = evaluation_data(self.data, pre.input_size, pre.channels, info.class_names)
        check_class_count(info, ev, "the evaluation data")
        return ev

    def session(self, composite: str | None = None, progress: ProgressFn | None = None,
                model: nn.Module | None = None, splits: DataSplits | None = None, *,
                device: str | torch.device = "auto", memory_budget_mb: float | None = None) -> CompressionSession:
        """Load the model (unless given) and the data, and build the :class:`CompressionSession`.

        Parameters
        ----------
        composite : str, optional
            LRP composite (default: the session's).
        progress : callable, optional
            ``progress(done, total)`` while relevance is computed.
        model : torch.nn.Module, optional
            An already loaded model of :attr:`model`.
        splits : DataSplits, optional
            Its data, already loaded by :meth:`load_data`.
        device, memory_budget_mb :
            Where the session computes and its memory budget (see :class:`CompressionSession`).
        """
        model = self.load_model() if model is None else model
        ref, ev, train = self.load_data(model_info(model)) if splits is None else splits
        kwargs: dict[str, Any] = {} if composite is None else {"composite": composite}
        return CompressionSession(model, ref, ev, epsilon=self.epsilon, target=self.target,
                                  reference_samples=self.data.reference_samples, progress=progress,
                                  train_data=train, device=device, memory_budget_mb=memory_budget_mb, **kwargs)

    def cli_words(self) -> list[str]:
        """The ``xaicomp`` options choosing the model, the data and the relevance settings (defaults left out)."""
        words = self.model.cli_words() + self.data.cli_words()
        if self.target != DEFAULT_TARGET:
            words += ["--target", self.target]
        if self.epsilon != DEFAULT_EPSILON:
            words += ["--epsilon", _num(self.epsilon)]
        return words

    def command(self, subcommand: str, plan: CompressionPlan | None = None, *,
                options: Iterable[Sequence[str]] = (), output: str | os.PathLike | None = None) -> CliCommand:
        """The ``xaicomp SUBCOMMAND`` command that loads these sources (and ``plan``).

        Parameters
        ----------
        subcommand : str
            ``compress``, ``sweep``, ``export`` or ``report``.
        plan : CompressionPlan, optional
        options : sequence of tuple of str
            The subcommand's own options, each ``(flag, *values)``, e.g. ``[("--codec", "zlib")]``.
        output : str, optional
            The ``-o`` file.
        """
        words = self.cli_words() + ([] if plan is None else plan.cli_words())
        return CliCommand(subcommand, words, options, output)

    def data_spec(self) -> dict[str, Any] | None:
        """How ``xaicomp verify`` can load the evaluation images again (:meth:`DataSource.record`)."""
        return self.data.record()

    @classmethod
    def of_session(cls, session: CompressionSession, data: DataSource | None = None) -> Sources:
        """The sources of a session as far as it tells: its model (:meth:`ModelSource.from_info`), its relevance
        settings, and ``data`` (default: the shipped data set)."""
        return cls(ModelSource.from_info(session.info), data or DataSource(), str(session.target),
                   float(session.epsilon))


__all__ = [
    "DATA_PLACEHOLDER", "DEFAULT_DATA", "DEFAULT_EPSILON", "DEFAULT_REFERENCE_SAMPLES", "DEFAULT_TARGET",
    "FOLDER_REFERENCE_IMAGES", "FOLDER_TRAIN_IMAGES", "SUBCOMMAND_OPTIONS", "WEIGHTS_PLACEHOLDER", "CliCommand",
    "DataSource", "DataSplits", "ModelSource", "Sources", "evaluation_data", "reference_subset", "resolve_data",
]
