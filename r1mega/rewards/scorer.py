"""Batch reward scoring: cheap checks in the trainer process, math-verify in killable worker processes.

Why worker processes (and not threads or in-process calls):

* math-verify's own timeout is ``signal.alarm``: integer seconds, main thread only; the trainer may score from
  a background thread, and an alarm cannot interrupt sympy while it sits in C code.
* A pathological expression from the policy can make sympy hang or take the interpreter down (deep recursion,
  memory). Only a separate process can be stopped for sure: a sample that overruns ``cfg.timeout_s`` has its
  worker killed and replaced, and scores accuracy 0; a step never stalls on one sample.

Why ``spawn``: the trainer has torch / gloo threads, and ``fork()`` after threads can copy a lock held by another
thread into the child, which then deadlocks. Spawned workers start a fresh interpreter. (Like any ``spawn``
child they re-import the trainer's ``__main__`` module, so keep its top level import-only.)

Why a fast path and lazy start: most math answers are plain numbers; those are decided in the parent in
microseconds (:func:`r1mega.rewards.math.fast_equivalent`; integer gold answers always are) with no IPC, and
workers start only when a sample first needs math-verify -- the arithmetic / GSM8K / AIME jobs never start one.
Format is always a regex in the parent. Work goes to workers in small chunks over pipes (one persistent pool, not
a process per sample), and duplicate (pred, gold) pairs -- common within a GRPO group -- are verified once and
cached across calls.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait as mp_wait

from .format import format_reward
from .math import MAX_ANSWER_CHARS, extract_answer, fast_equivalent, is_equivalent
from .workers import Worker, kill_worker, stop_workers, worker_main

__all__ = ["RewardBatch", "RewardScorer", "DEFAULT_VERIFY_FN"]

logger = logging.getLogger(__name__)

DEFAULT_VERIFY_FN = "r1mega.rewards.math:is_equivalent"

_TIMEOUT = "timeout"
_ERROR = "error"
_MAX_CHUNK = 8
_MAX_START_FAILURES = 3


@dataclass
class RewardBatch:
    """Per-sample rewards of one :meth:`RewardScorer.score` call (lists aligned with the inputs)."""

    accuracy: list[float] = field(default_factory=list)
    format: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    num_timeouts: int = 0  # samples whose verification overran cfg.timeout_s (scored accuracy 0)
    num_errors: int = 0  # samples whose verifier raised or whose worker died (scored accuracy 0)


def _digest(pred: str, gold: str) -> bytes:
    return hashlib.blake2b(f"{gold}\x00{pred}".encode("utf-8", "surrogatepass"), digest_size=16).digest()


class RewardScorer:
    """R1 rule-based rewards for a batch: ``total = accuracy_weight * accuracy + format_weight * format``.

    Args:
        cfg: :class:`r1mega.config.RewardConfig` (weights, ``timeout_s`` per sample, ``num_workers``).
        verify_fn: ``"module:function"`` that workers call as ``fn(pred, gold) -> bool`` on answers the numeric
            fast path cannot decide. Tests point it at a verifier that hangs or crashes. ``None`` verifies in the
            calling process instead (debugging only: no hard timeout).
        start_timeout_s: how long a worker may take to start before it counts as failed.
        batch_timeout_s: cap on the worker phase of one :meth:`score` call; samples still unverified then count as
            timeouts. ``None`` = ``cfg.batch_timeout_s`` (default 20 s); 0 = no cap (each sample is still capped by
            ``cfg.timeout_s``, so n distinct pathological answers cost n x timeout_s / num_workers).
        cache_size: (pred, gold) verdicts kept across calls, timeouts included (a pathological answer repeated by
            the policy then costs one timeout, not one per step); 0 disables.
        think_in_prompt: passed to :func:`format_reward` (for templates whose prompt ends with ``<think>``).

    Use as a context manager or call :meth:`close`. Thread-safe; calls are serialised by a lock.
    """

    def __init__(
        self,
        cfg,
        verify_fn: str | None = DEFAULT_VERIFY_FN,
        *,
        start_timeout_s: float = 60.0,
        batch_timeout_s: float | None = None,
        cache_size: int = 65536,
        think_in_prompt: bool = False,
    ) -> None:
        self.accuracy_weight = float(cfg.accuracy_weight)
        self.format_weight = float(cfg.format_weight)
        self.timeout_s = float(cfg.timeout_s)
        self.num_workers = max(1, int(cfg.num_workers))
        if self.timeout_s <= 0:
            raise ValueError(f"reward.timeout_s={cfg.timeout_s} must be > 0")
        self.verify_fn = verify_fn
        self.start_timeout_s = float(start_timeout_s)
        self.batch_timeout_s = batch_timeout_s if batch_timeout_s is not None else getattr(cfg, "batch_timeout_s", None)
        self.cache_size = int(cache_size)
        self.think_in_prompt = think_in_prompt or bool(getattr(cfg, "think_in_prompt", False))
        self._cache: OrderedDict[bytes, object] = OrderedDict()  # digest of (pred, gold) -> verdict
        self._ctx = mp.get_context("spawn")
        self._workers: list[Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        # counters for logging
        self.num_restarts = 0
        self.num_verified = 0  # (pred, gold) pairs sent to the verifier
        self._finalizer = weakref.finalize(self, stop_workers, self._workers, False)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (idempotent). The scorer cannot be used afterwards."""
        with self._lock:
            self._closed = True
            stop_workers(self._workers, graceful=True)
            self._finalizer.detach()

    @property
    def num_live_workers(self) -> int:
        return sum(1 for w in self._workers if w.proc.is_alive())

    def start(self, wait: bool = True) -> None:
        """Start the workers now instead of lazily (e.g. to overlap their start-up with model loading).

        With ``wait``, block until all are ready or ``start_timeout_s`` passes.
        """
        if self.verify_fn is None:
            return
        with self._lock:
            self._check_open()
            self._ensure_workers()
            if not wait:
                return
            end = time.monotonic() + self.start_timeout_s
            while time.monotonic() < end:
                waiting = [w for w in self._workers if not w.ready]
                if not waiting or any(w.dead for w in waiting):  # a dead one is replaced by the next score()
                    return
                mp_wait([w.conn for w in waiting], timeout=max(0.0, end - time.monotonic()))
                self._poll({})

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("RewardScorer is closed")

    def _spawn(self) -> Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        life_r, life_w = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=worker_main,
            args=(child_conn, self.verify_fn, os.getpid(), life_r),
            name="r1mega-reward-worker",
            daemon=True,
        )
        proc.start()
        child_conn.close()
        life_r.close()
        return Worker(proc, parent_conn, life_w)

    def _ensure_workers(self) -> None:
        for w in list(self._workers):
            if w.dead or not w.proc.is_alive():
                self._replace(w)
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())

    def _replace(self, w: Worker) -> None:
        """Kill ``w`` (hung, crashed or failed to start) and start a fresh worker in its slot."""
        kill_worker(w)
        self._workers[self._workers.index(w)] = self._spawn()
        self.num_restarts += 1

    # ------------------------------------------------------------------ scoring

    def score(self, responses: list[str], golds: list[str]) -> RewardBatch:
        """Score completions against reference answers. Never raises on odd model output; a sample that times out
        or errors gets accuracy 0 and is counted in ``num_timeouts`` / ``num_errors``."""
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
        with self._lock:
            self._check_open()
            return self._score(responses, golds)

    def _score(self, responses: list[str], golds: list[str]) -> RewardBatch:
        n = len(responses)
        fmt = [format_reward(r, think_in_prompt=self.think_in_prompt) for r in responses]
        acc = [0.0] * n
        todo: dict[tuple[str, str], list[int]] = {}
        for i, (resp, gold) in enumerate(zip(responses, golds, strict=True)):
            pred = extract_answer(resp)
            if pred is None or gold is None or len(pred) > MAX_ANSWER_CHARS:
                continue
            gold = str(gold).strip()
            fast = fast_equivalent(pred, gold)
            if fast is not None:
                acc[i] = float(fast)
            else:
                todo.setdefault((pred, gold), []).append(i)
        num_timeouts = num_errors = 0
        if todo:
            keys = list(todo)
            for key, verdict in zip(keys, self._verify(keys), strict=True):
                idx = todo[key]
                if verdict is True:
                    for i in idx:
                        acc[i] = 1.0
                elif verdict == _TIMEOUT:
                    num_timeouts += len(idx)
                elif verdict == _ERROR:
                    num_errors += len(idx)
        total = [self.accuracy_weight * a + self.format_weight * f for a, f in zip(acc, fmt, strict=True)]
        return RewardBatch(accuracy=acc, format=fmt, total=total, num_timeouts=num_timeouts, num_errors=num_errors)

    def _verify(self, keys: list[tuple[str, str]]) -> list[object]:
        """Verdict per (pred, gold): True, False, _TIMEOUT or _ERROR. Consults and fills the cache."""
        verdicts: list[object] = [None] * len(keys)
        digests = [_digest(p, g) for p, g in keys]
        missing = []
        for j, d in enumerate(digests):
            hit = self._cache.get(d)
            if hit is not None:
                self._cache.move_to_end(d)
                verdicts[j] = hit
            else:
                missing.append(j)
        if missing:
            items = [keys[j] for j in missing]
            self.num_verified += len(items)
            if self.verify_fn is None:
                fresh = [self._verify_inline(p, g) for p, g in items]
            else:
                fresh = self._run_pool(items)
            for j, v in zip(missing, fresh, strict=True):
                verdicts[j] = v
                if self.cache_size > 0 and v != _ERROR:
                    self._cache[digests[j]] = v
                    if len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
        return verdicts

    @staticmethod
    def _verify_inline(pred: str, gold: str) -> object:
        try:
            return bool(is_equivalent(pred, gold))
        except Exception:  # noqa: BLE001
            logger.debug("verifier error", exc_info=True)
            return _ERROR

    # ------------------------------------------------------------------ the pool

    def _poll(self, results: dict[int, object]) -> None:
        """Read every message waiting from the workers; mark workers whose pipe hit EOF as dead."""
        for w in self._workers:
            try:
                while w.conn.poll():
                    msg = w.conn.recv()
                    head = msg[0]
                    if head == "ready":
                        w.ready = True
                    elif head == "fail":
                        raise RuntimeError(f"reward worker could not start verify_fn={self.verify_fn!r}:\n{msg[1]}")
                    else:
                        key, ok, value = msg
                        if w.inflight and w.inflight[0] == key:
                            w.inflight.popleft()
                            results[key] = value if ok else _ERROR
                            if not ok:
                                logger.warning("reward verifier raised: %s", value)
                        w.deadline = time.monotonic() + self.timeout_s if w.inflight else float("inf")
            except (EOFError, OSError):
                w.dead = True

    def _run_pool(self, items: list[tuple[str, str]]) -> list[object]:
        self._ensure_workers()
        results: dict[int, object] = {}
        pending: deque[int] = deque(range(len(items)))
        start_failures = 0
        batch_end = time.monotonic() + self.batch_timeout_s if self.batch_timeout_s else float("inf")
        try:
            while pending or any(w.inflight for w in self._workers):
                now = time.monotonic()
                # 1. hand out work to idle ready workers
                idle = [w for w in self._workers if w.ready and not w.dead and not w.inflight]
                for w in idle:
                    if not pending:
                        break
                    size = max(1, min(_MAX_CHUNK, len(pending) // (2 * len(idle))))
                    chunk = [pending.popleft() for _ in range(min(size, len(pending)))]
                    try:
                        w.conn.send([(j, *items[j]) for j in chunk])
                    except (OSError, ValueError):
                        pending.extendleft(reversed(chunk))
                        w.dead = True
                        continue
                    w.inflight = deque(chunk)
                    w.deadline = now + self.timeout_s
                # 2. sleep until a message, a worker exit, or the next deadline
                wake = min(
                    [batch_end]
                    + [w.deadline for w in self._workers if w.inflight]
                    + [w.started + self.start_timeout_s for w in self._workers if not w.ready]
                )
                handles = [w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers]
                mp_wait(handles, timeout=max(0.0, min(wake - now, 5.0)))
                self._poll(results)
                # 3. crashed, hung, or never-started workers
                now = time.monotonic()
                for w in list(self._workers):
                    if not w.dead and not w.proc.is_alive():
                        self._poll(results)  # results it sent before dying
                        w.dead = True
                    if w.dead:
                        if w.inflight:
                            j = w.inflight.popleft()
                            results[j] = _ERROR
                            logger.warning("reward worker died (exit code %s) on one sample", w.proc.exitcode)
                            pending.extendleft(reversed(w.inflight))
                        elif not w.ready:
                            start_failures += 1
                        self._replace(w)
                    elif w.inflight and now >= w.deadline:
                        j = w.inflight.popleft()
                        results[j] = _TIMEOUT
                        logger.warning("reward verification exceeded %.1fs; worker killed", self.timeout_s)
                        pending.extendleft(reversed(w.inflight))
                        w.inflight.clear()
                        self._replace(w)
                    elif not w.ready and now - w.started > self.start_timeout_s:
                        start_failures += 1
                        self._replace(w)
                # 4. give up rather than stall
                if now >= batch_end:
                    for w in list(self._workers):
                        if w.inflight:
                            for j in w.inflight:
                                results[j] = _TIMEOUT
                            w.inflight.clear()
                            self._replace(w)
                    for j in pending:
                        results[j] = _TIMEOUT
                    pending.clear()
                    logger.warning("reward batch exceeded batch_timeout_s=%s", self.batch_timeout_s)
                if start_failures >= _MAX_START_FAILURES and not any(w.ready for w in self._workers):
                    logger.error(
                        "reward workers failed to start %d times; %d samples unscored", start_failures, len(pending)
                    )
                    for j in pending:
                        results[j] = _ERROR
                    pending.clear()
        except BaseException:
            # leave no worker holding stale work for the next call
            for w in list(self._workers):
                if w.inflight:
                    w.inflight.clear()
                    self._replace(w)
            raise
        return [results.get(j, _ERROR) for j in range(len(items))]
