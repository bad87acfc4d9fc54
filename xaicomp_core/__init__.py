"""xaicomp: compress image classifiers with explainable AI (LRP relevance) and see the trade-off.

Implements "Compressing Deep Neural Networks Using Explainable AI" (Soroush, Raji, Ghavami, arXiv 2507.05286):
per-weight LRP relevance, computed with zennit, decides which weights to prune and how many bits each kept weight
gets.
"""

from xaicomp_core.compress import hybrid_criteria  # noqa: F401  (registers the hybrid and iterative criteria)
from xaicomp_core.compress.compress import CompressedWeights, Compressor, compress
from xaicomp_core.compress.criteria import Criterion, ScoreInputs, register_criterion
from xaicomp_core.compress.quantize import Quantizer, register_quantizer
from xaicomp_core.errors import DataError, FormatError, PlanError, WeightsError, XaicompError
from xaicomp_core.evaluate.session import CompressionSession, EvaluationResult
from xaicomp_core.format.packing import load_packed_model, read_packed
from xaicomp_core.format.size import SizeBreakdown
from xaicomp_core.io import onnx_import, user_code  # noqa: F401  (register the ONNX and Python-factory loaders)
from xaicomp_core.io.data import (
    ImageDataset,
    Preprocessing,
    load_builtin_dataset,
    load_image_folder,
    load_torchvision_folder,
)
from xaicomp_core.io.export import export_packed, verify_packed
from xaicomp_core.io.models import (
    BUILTIN_MODELS,
    ModelInfo,
    load_builtin_model,
    load_model,
    load_torchvision_model,
    load_weights_file,
    model_info,
)
from xaicomp_core.plan import CRITERIA, CompressionPlan
from xaicomp_core.registry import load_plugins
from xaicomp_core.relevance.composites import COMPOSITES, CompositeSpec, register_composite
from xaicomp_core.relevance.lrp import RelevanceResult, compute_relevance, input_heatmaps, weight_relevance
from xaicomp_core.version import __version__  # noqa: E402,F401

__all__ = [
    "BUILTIN_MODELS", "COMPOSITES", "CRITERIA", "CompressionPlan", "CompressionSession", "DataError",
    "EvaluationResult", "FormatError", "ImageDataset", "ModelInfo", "PlanError", "Preprocessing",
    "RelevanceResult", "SizeBreakdown", "WeightsError", "XaicompError", "compute_relevance", "input_heatmaps",
    "load_builtin_dataset", "load_builtin_model", "load_image_folder", "load_model", "load_torchvision_folder",
    "load_torchvision_model", "load_weights_file", "model_info", "weight_relevance", "export_packed", "verify_packed",
    "load_packed_model", "read_packed", "compress", "CompressedWeights", "Compressor", "Criterion", "ScoreInputs",
    "register_criterion", "Quantizer", "register_quantizer", "CompositeSpec", "register_composite", "load_plugins",
]
