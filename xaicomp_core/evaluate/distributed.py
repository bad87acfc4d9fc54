"""Plans evaluated on Ray workers: ``xaicomp sweep --ray [ADDRESS]`` and ``make results RAY=ADDRESS``.

The driver computes the relevance once (per composite the plans need) and puts it, with the model and the
model-ready reference, evaluation and fine-tuning tensors, into Ray's object store (one ``ray.put``). Each plan is
one Ray task; a worker process builds its :class:`~xaicomp_core.evaluate.session.CompressionSession` once from that
object (seeding it with :meth:`~xaicomp_core.evaluate.session.CompressionSession.set_relevance`, so workers never
recompute relevance) and keeps it for the later plans it runs. Results come back in plan order, so a sweep on Ray
gives the same rows as :func:`~xaicomp_core.evaluate.sweep.run_sweep` (both build them with
:func:`~xaicomp_core.evaluate.sweep.sweep_rows`). A task whose worker dies (killed, out of memory, a lost node) is
run again by Ray (``max_retries``); an error raised by the plan itself is not retried.

Ray is an optional extra (``pip install 'xaicomp[ray]'``): this module imports it only when called, and without it
the call raises one readable :class:`~xaicomp_core.errors.XaicompError`.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from xaicomp_core.errors import XaicompError
from xaicomp_core.evaluate.session import CompressionSession, EvaluationResult
from xaicomp_core.evaluate.sweep import DEFAULT_RATIOS, BitSetting, sweep_plans, sweep_rows
from xaicomp_core.plan import CompressionPlan
from xaicomp_core.relevance.lrp import RelevanceResult

ProgressFn = Callable[[int, int], None]

#: The one line ``--ray`` prints (after ``xaicomp: error:``) when the ray package is missing.
RAY_MISSING = "--ray needs the ray package: pip install 'xaicomp[ray]'"
#: How often Ray runs a plan again whose worker process died.
MAX_RETRIES = 3
#: Addresses that mean "start a local Ray instance" (like no address at all).
LOCAL_ADDRESSES = ("", "local")


def import_ray() -> ModuleType:
    """The ``ray`` module.

    Raises
    ------
    XaicompError
        If ray is not installed (:data:`RAY_MISSING`).
    """
    try:
        import ray
    except ImportError:
        raise XaicompError(RAY_MISSING) from None
    return ray


@contextlib.contextmanager
def ray_instance(address: str | None = None, num_cpus: int | None = None) -> Iterator[ModuleType]:
    """Ray, connected for the ``with`` block.

    Parameters
    ----------
    address : str, optional
        A running cluster's address (``HEAD:6379``, or ``auto`` for the one ``ray start`` made on this machine):
        ``ray.init(address=...)`` connects to it. None, ``""`` or ``"local"`` start a local instance with
        ``num_cpus`` CPUs (default ``os.cpu_count()``) whose node address is 127.0.0.1, without dashboard and usage
        reporting (Ray's gRPC servers still listen on all interfaces: Ray 2.x has no setting for that).
    num_cpus : int, optional
        CPUs of a local instance.

    If Ray is already initialised in this process (a notebook, a test), that instance is used and left running;
    otherwise the connection (and a local instance) ends with the block.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address is None or address in LOCAL_ADDRESSES:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # address="local": a new instance even where `ray start` left a cluster (or RAY_ADDRESS) behind
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 _node_ip_address="127.0.0.1", configure_logging=False, log_to_driver=False)
    else:
        _check_reachable(address)
        try:
            ray.init(address=address, configure_logging=False, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise XaicompError(f"cannot connect to the Ray cluster at {address!r}: {e} (a cluster with token "
                               "authentication, Ray's default, also needs RAY_AUTH_MODE=token here and its token in "
                               "RAY_AUTH_TOKEN or ~/.ray/auth_token)") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def require_ray(address: str | None = None) -> ModuleType:
    """The ``ray`` module, checked before any work: installed, and ``address`` (if a ``HOST:PORT``) reachable.

    Raises
    ------
    XaicompError
        If ray is missing (:data:`RAY_MISSING`) or nothing listens at ``address``.
    """
    ray = import_ray()
    if address is not None and address not in LOCAL_ADDRESSES:
        _check_reachable(address)
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse a ``HOST:PORT`` nothing listens on at once (``ray.init`` would wait for minutes)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # "auto", ray:// client addresses: Ray itself checks them
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise XaicompError(f"cannot reach the Ray cluster at {address!r} ({e.strerror or e}); start it with "
                           f"'ray start --head --port={port}' on {host}") from None


# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to rebuild the driver's session (put into Ray's object store once).

    Attributes
    ----------
    model : torch.nn.Module
        The original model.
    reference, evaluation : tuple of Tensor
        Model-ready ``(inputs, labels)``.
    train : tuple of Tensor or None
        Model-ready fine-tuning data, if the session has any.
    settings : dict
        The session's keyword arguments (composite, epsilon, target, batch sizes, device, memory budget).
    relevance : dict of str to RelevanceResult
        The relevance computed by the driver, per composite.
    threads : int
        torch CPU threads per task.
    """

    model: nn.Module
    reference: tuple[torch.Tensor, torch.Tensor]
    evaluation: tuple[torch.Tensor, torch.Tensor]
    train: tuple[torch.Tensor, torch.Tensor] | None
    settings: dict[str, Any]
    relevance: dict[str, RelevanceResult]
    threads: int

    @classmethod
    def of(cls, session: CompressionSession, composites: Sequence[str], threads: int = 1,
           device: str = "auto") -> WorkerSpec:
        """The spec of ``session`` with its relevance for ``composites`` (computed here if not cached yet); the
        workers compute on ``device`` (``"auto"``: each worker's GPU if it has one, else its CPU)."""
        return cls(session.model, (session.x_ref, session.y_ref), (session.x_eval, session.y_eval),
                   session.train_tensors() if session.can_finetune else None,
                   {"composite": session.composite, "epsilon": session.epsilon, "target": session.target,
                    "relevance_batch_size": session.relevance_batch_size,
                    "eval_batch_size": session.eval_batch_size, "device": device,
                    "memory_budget_mb": session.memory_budget_mb},
                   {c: session.relevance(c) for c in dict.fromkeys(composites)}, threads)

    def session(self) -> CompressionSession:
        """A session equal to the driver's, its relevance seeded (never recomputed)."""
        s = CompressionSession(self.model, self.reference, self.evaluation, train_data=self.train, **self.settings)
        for composite, rel in self.relevance.items():
            s.set_relevance(rel, composite)
        return s


#: Per worker process: the session of the spec it last served (key: the spec's object id).
_WORKER_SESSION: dict[str, CompressionSession] = {}


def _worker_session(spec_ref: Any) -> CompressionSession:
    import ray

    key = spec_ref.hex()
    session = _WORKER_SESSION.get(key)
    if session is None:
        spec: WorkerSpec = ray.get(spec_ref)
        torch.set_num_threads(spec.threads)
        session = spec.session()
        _WORKER_SESSION.clear()  # one session per worker process: the newest sweep's
        _WORKER_SESSION[key] = session
    return session


def evaluate_plan(spec_holder: list[Any], plan: CompressionPlan) -> EvaluationResult:
    """The Ray task: evaluate ``plan`` with this worker's session (``spec_holder[0]`` is the spec's object
    reference, wrapped in a list so that Ray hands the reference, not the object, to every task)."""
    return _worker_session(spec_holder[0]).evaluate(plan)


class RayEvaluator:
    """Evaluate plans of one session on Ray workers.

    Parameters
    ----------
    session : CompressionSession
        The driver's session: its model, data, settings and relevance are shared with the workers.
    threads : int
        torch threads (and Ray CPUs) per task. Plans without fine-tuning gave the same numbers at every thread
        count tried (the tests compare 1 thread per task with the driver's 2); give fine-tuned plans the driver's
        thread count to get its numbers bit for bit (``make results`` does).
    max_retries : int
        Runs of a plan again after its worker process died.
    device : {"auto", "cpu", "cuda"}
        Where the workers compute (``"auto"``: each worker's GPU if it has one, else its CPU).

    Ray must be initialised (see :func:`ray_instance`).
    """

    def __init__(self, session: CompressionSession, threads: int = 1, max_retries: int = MAX_RETRIES,
                 device: str = "auto") -> None:
        if threads < 1:
            raise XaicompError("threads per Ray task must be at least 1")
        self.ray = import_ray()
        self.session = session
        self.threads = threads
        self.device = device
        self._task = self.ray.remote(evaluate_plan).options(num_cpus=threads, max_retries=max_retries,
                                                            retry_exceptions=False)
        self._spec_ref: Any = None
        self._composites: tuple[str, ...] = ()

    def _spec(self, plans: Sequence[CompressionPlan]) -> Any:
        composites = tuple(dict.fromkeys(
            [*self._composites, *(p.composite for p in plans if self.session.compressor.needs_relevance(p))]))
        if self._spec_ref is None or composites != self._composites:
            self._composites = composites
            self._spec_ref = self.ray.put(WorkerSpec.of(self.session, composites, self.threads, self.device))
        return self._spec_ref

    def evaluate(self, plans: Sequence[CompressionPlan], progress: ProgressFn | None = None
                 ) -> list[EvaluationResult]:
        """Exact results of ``plans``, in their order; ``progress(done, total)`` as they arrive.

        Raises
        ------
        XaicompError
            A user error raised by a plan on its worker (the same as in-process).
        """
        plans = list(plans)
        if not plans:
            return []
        holder = [self._spec(plans)]
        refs = [self._task.remote(holder, plan) for plan in plans]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[EvaluationResult | None] = [None] * len(plans)
        pending = list(refs)
        try:
            while pending:
                ready, pending = self.ray.wait(pending, num_returns=1)
                for ref in ready:
                    results[index[ref]] = self.ray.get(ref)
                if progress is not None:
                    progress(len(plans) - len(pending), len(plans))
        except self.ray.exceptions.RayTaskError as e:
            for ref in pending:
                self.ray.cancel(ref)
            if isinstance(e.cause, XaicompError):
                raise e.cause from None
            raise
        return [r for r in results if r is not None]

    def prefetch(self, plans: Sequence[CompressionPlan], progress: ProgressFn | None = None) -> int:
        """Evaluate the plans the driver's session has not cached on the workers and add the results to its cache
        (:meth:`~xaicomp_core.evaluate.session.CompressionSession.add_result`), so that later ``evaluate`` calls
        return at once. Returns the number of plans evaluated."""
        todo = list({p.key(): p for p in plans if not self.session.is_cached(p)}.values())
        for result in self.evaluate(todo, progress):
            self.session.add_result(result)
        return len(todo)


def run_sweep_ray(session: CompressionSession, criteria: Sequence[str], ratios: Sequence[float] = DEFAULT_RATIOS,
                  bits: Sequence[BitSetting] = (BitSetting(),), base: CompressionPlan | None = None,
                  progress: ProgressFn | None = None, address: str | None = None, threads: int = 1,
                  device: str = "auto") -> list[dict[str, Any]]:
    """:func:`~xaicomp_core.evaluate.sweep.run_sweep` with the plans evaluated on Ray: the same rows, in the
    same order.

    Parameters
    ----------
    session, criteria, ratios, bits, base, progress
        As for :func:`~xaicomp_core.evaluate.sweep.run_sweep`.
    address : str, optional
        The Ray cluster (see :func:`ray_instance`); None starts a local instance sized to this machine.
    threads : int
        torch threads (and Ray CPUs) per task.
    device : {"auto", "cpu", "cuda"}
        Where the workers compute.
    """
    plans = sweep_plans(criteria, ratios, bits, base)
    with ray_instance(address):
        results = RayEvaluator(session, threads=threads, device=device).evaluate(plans, progress)
    return sweep_rows(plans, results)
