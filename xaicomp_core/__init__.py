"""xaicomp: compress image classifiers with explainable AI (LRP relevance) and see the trade-off.

Implements "Compressing Deep Neural Networks Using Explainable AI" (Soroush, Raji, Ghavami, arXiv 2507.05286):
per-weight LRP relevance, computed with zennit, decides which weights to prune and how many bits each kept weight
gets.
"""

from .data import ImageDataset, Preprocessing, load_builtin_dataset, load_image_folder, load_torchvision_folder
from .errors import DataError, FormatError, PlanError, WeightsError, XaicompError
from .export import export_packed, verify_packed
from .models import (
    BUILTIN_MODELS,
    ModelInfo,
    load_builtin_model,
    load_model,
    load_torchvision_model,
    load_weights_file,
    model_info,
)
from .packing import load_packed_model, read_packed
from .plan import CRITERIA, CompressionPlan
from .relevance import COMPOSITES, RelevanceResult, compute_relevance, input_heatmaps, weight_relevance
from .session import CompressionSession, EvaluationResult
from .size import SizeBreakdown

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_MODELS", "COMPOSITES", "CRITERIA", "CompressionPlan", "CompressionSession", "DataError",
    "EvaluationResult", "FormatError", "ImageDataset", "ModelInfo", "PlanError", "Preprocessing",
    "RelevanceResult", "SizeBreakdown", "WeightsError", "XaicompError", "compute_relevance", "input_heatmaps",
    "load_builtin_dataset", "load_builtin_model", "load_image_folder", "load_model", "load_torchvision_folder",
    "load_torchvision_model", "load_weights_file", "model_info", "weight_relevance", "export_packed", "verify_packed",
    "load_packed_model", "read_packed",
]
