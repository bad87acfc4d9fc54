"""Where the engine computes, and how many images one batch may hold.

* :func:`resolve_device` turns ``"auto"`` / ``"cpu"`` / ``"cuda"`` into a :class:`torch.device` (``"auto"``: the
  GPU when torch sees one, else the CPU). Asking for ``"cuda"`` without a GPU is one readable
  :class:`DeviceError`. Choosing CUDA switches TF32 off for convolutions and matrix products (process-wide): the
  engine's accuracy is float32, never a reduced precision that can change predictions.
* Memory: :func:`measure_memory_cost` runs one forward pass of a private copy of a model on one image with forward
  hooks and records the bytes of every leaf module's output (the activations a backward pass keeps, per image) and
  the largest of them (what an inference pass holds at once). :meth:`MemoryCost.relevance_batch` and
  :meth:`MemoryCost.evaluation_batch` turn a memory budget (:func:`memory_budget_bytes`: ``memory_budget_mb``, or
  :data:`DEFAULT_MEMORY_BUDGET_MB`; on CUDA also at most :data:`CUDA_FREE_SHARE` of the free device memory reported
  by ``torch.cuda.mem_get_info``) into the number of images per batch, never more than the caller's batch size
  (so the defaults of a small model keep their batches and their exact numbers).
"""

from __future__ import annotations

import copy
import resource
import sys
from dataclasses import dataclass

import torch
from torch import nn

from xaicomp_core.errors import XaicompError

#: The choices of ``--device`` and of the app's sidebar.
DEVICES = ("auto", "cpu", "cuda")
#: Memory one relevance or evaluation pass may take when no budget is given (MiB).
DEFAULT_MEMORY_BUDGET_MB = 2048.0
#: On CUDA a pass may take at most this share of the device memory free when the session starts.
CUDA_FREE_SHARE = 0.6
#: Bytes a relevance pass holds per byte of forward activations (the saved forward values plus the backward's
#: relevance and gradient buffers; measured on a torchvision ResNet-18, see ``tests/test_device.py``).
RELEVANCE_FACTOR = 3.0
#: Bytes an inference pass holds per byte of the largest activation (its input, its output and a residual branch).
EVALUATION_FACTOR = 4.0
#: Copies of the parameters a relevance pass holds besides the activations (working copy, per-batch store, the
#: signed and the per-class sums).
RELEVANCE_PARAM_COPIES = 4


class DeviceError(XaicompError):
    """A device that this machine does not have, or a memory budget that cannot hold one image."""


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU."""
    return bool(torch.cuda.is_available())


def device_choices() -> list[str]:
    """The device choices that exist on this machine: ``"auto"`` and ``"cpu"`` always, ``"cuda"`` with a GPU."""
    return ["auto", "cpu"] + (["cuda"] if cuda_available() else [])


def resolve_device(device: str | torch.device | None = "auto", option: str = "device") -> torch.device:
    """The :class:`torch.device` for a device choice.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"} or torch.device or None
        ``"auto"`` (and None): CUDA if available, else the CPU. ``"cuda:1"`` names a GPU.
    option : str
        How the caller names the setting in an error (``"--device"`` on the command line).

    Raises
    ------
    DeviceError
        For CUDA on a machine without a GPU (``torch.cuda.is_available()`` is False), or an unknown name.
    """
    name = "auto" if device is None else str(device)
    if name == "auto":
        name = "cuda" if cuda_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not cuda_available():
            raise DeviceError(f"{option} {name}: no CUDA GPU is available on this machine "
                              "(torch.cuda.is_available() is False)")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise DeviceError(f"{option} {name}: not a device name; use auto, cpu or cuda") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        exact_float32()
        return dev
    raise DeviceError(f"{option} {name!r}: choose one of {', '.join(DEVICES)}")


def exact_float32() -> None:
    """Switch TF32 off for CUDA convolutions and matrix products (float32 means float32 for reported accuracy)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def module_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (the CPU for a model without any)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` itself if it is on ``device``, else a deep copy moved there (the caller's model never moves)."""
    if module_device(model) == device:
        return model
    return copy.deepcopy(model).to(device)


# ----------------------------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------------------------
def memory_budget_bytes(device: torch.device, memory_budget_mb: float | None = None) -> int:
    """Bytes one pass may take on ``device``: ``memory_budget_mb`` (default :data:`DEFAULT_MEMORY_BUDGET_MB`); on
    CUDA the default is :data:`CUDA_FREE_SHARE` of the free device memory, and a given budget is capped by it.

    Raises
    ------
    DeviceError
        For a budget that is not a positive number.
    """
    if memory_budget_mb is not None and not memory_budget_mb > 0:
        raise DeviceError(f"the memory budget must be a positive number of MB, not {memory_budget_mb}")
    budget = int((DEFAULT_MEMORY_BUDGET_MB if memory_budget_mb is None else memory_budget_mb) * 2**20)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        share = int(free * CUDA_FREE_SHARE)
        budget = share if memory_budget_mb is None else min(budget, share)
    return budget


@dataclass(frozen=True)
class MemoryCost:
    """Bytes per image of a model's forward pass, measured by :func:`measure_memory_cost`.

    Attributes
    ----------
    activations : int
        Sum of the outputs of every leaf module (what a backward pass keeps), per image.
    largest : int
        The largest leaf output, per image.
    input : int
        One input image.
    params : int
        The model's parameters and buffers.
    """

    activations: int
    largest: int
    input: int
    params: int

    def relevance_image_bytes(self) -> int:
        """Estimated bytes per image of a relevance pass."""
        return int(RELEVANCE_FACTOR * self.activations) + 2 * self.input

    def evaluation_image_bytes(self) -> int:
        """Estimated bytes per image of an inference pass."""
        return int(EVALUATION_FACTOR * self.largest) + self.input

    def relevance_batch(self, budget: int, most: int) -> int:
        """Images per relevance batch within ``budget`` bytes (at least 1, at most ``most``)."""
        return _batch(budget - RELEVANCE_PARAM_COPIES * self.params, self.relevance_image_bytes(), most)

    def evaluation_batch(self, budget: int, most: int) -> int:
        """Images per evaluation batch within ``budget`` bytes (at least 1, at most ``most``)."""
        return _batch(budget - 2 * self.params, self.evaluation_image_bytes(), most)


def _batch(room: int, per_image: int, most: int) -> int:
    return max(1, min(int(most), room // max(per_image, 1)))


def measure_memory_cost(model: nn.Module, sample: torch.Tensor, private: bool = False) -> MemoryCost:
    """Measure :class:`MemoryCost` with forward hooks on one forward pass of one image (no gradient).

    Parameters
    ----------
    model : nn.Module
        In eval mode. Hooks are added to it for the pass and removed; unless ``private`` (a copy only the caller
        uses), the pass runs on a deep copy so that the caller's model never carries a hook.
    sample : Tensor
        At least one model-ready input (the first is used), on the model's device.
    """
    work = model if private else copy.deepcopy(model).eval()
    sizes: list[int] = []

    def hook(_module: nn.Module, _inp: object, out: object) -> None:
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                sizes.append(t.numel() * t.element_size())

    leaves = [m for m in work.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves]
    x = sample[:1]
    try:
        with torch.no_grad():
            out = work(x)
    finally:
        for h in handles:
            h.remove()
    if isinstance(out, torch.Tensor):
        sizes.append(out.numel() * out.element_size())
    params = sum(t.numel() * t.element_size() for t in (*work.parameters(), *work.buffers()))
    return MemoryCost(sum(sizes), max(sizes, default=0), x.numel() * x.element_size(), params)


def peak_rss_mb() -> float:
    """The process's peak resident memory (MiB) since it started or since :func:`reset_peak_rss`.

    On Linux the high-water mark of the process's own memory (``VmHWM`` in ``/proc/self/status``): unlike
    ``getrusage``'s ``ru_maxrss``, it does not carry over the resident memory of the parent a process was forked
    from (``ru_maxrss`` of a program started by a large process, e.g. a test run, begins at the parent's size), and
    :func:`reset_peak_rss` resets it. Elsewhere ``resource.getrusage(RUSAGE_SELF).ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def current_rss_mb() -> float | None:
    """The process's resident memory now (MiB; None where ``/proc/self/statm`` does not exist)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * resource.getpagesize() / 2**20


def reset_peak_rss() -> bool:
    """Start a new peak measurement for :func:`peak_rss_mb`: free heap memory goes back to the system
    (``malloc_trim``) and the peak is reset to the current resident memory (Linux: ``/proc/self/clear_refs``).
    Returns False where that is not supported (the peak then stays the process's peak so far)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, AttributeError):
        return False
    return True


__all__ = ["CUDA_FREE_SHARE", "DEFAULT_MEMORY_BUDGET_MB", "DEVICES", "DeviceError", "MemoryCost", "cuda_available",
           "device_choices", "exact_float32", "measure_memory_cost", "memory_budget_bytes", "module_device",
           "on_device", "current_rss_mb", "peak_rss_mb", "reset_peak_rss", "resolve_device"]
