"""The online latency controller (`--online-latency-target`): how much batch work may be in the engine while
online requests are being answered, steered by how much slower they are than on an idle engine.

Why a controller. An online request shares every engine step with the batch's running sequences. Where a
step's cost grows with the sequences in it (a CPU), it decodes several times slower beside a full batch than
alone; narrowing the batch (fewer batch requests in the engine) brings that back down, at a price in batch
throughput. Where a step's cost barely grows (a GPU), narrowing buys nothing and only costs. No fixed window is
right for both, nor for one machine under different loads, so the server measures and steers:

- **The signal**: each successful online answer's seconds per output token (per request for endpoints that
  generate none, such as embeddings), over the *idle baseline* for its model and endpoint. The ratio is what
  the target bounds: `--online-latency-target 2` asks that online requests beside batches take at most twice
  as long as alone.
- **The idle baseline** is measured, not configured: an online answer during which no batch request was in
  the engine at all is an idle sample; the baseline is the median of the last IDLE_SAMPLES. It refreshes
  whenever online requests arrive while no batch runs. With no baseline yet for a model and endpoint (online
  requests only ever came while batches ran), or one older than REFRESH_SECONDS, the controller *probes*:
  batch work takes no new turns until one online request has run alone (at most PROBE_SECONDS, at most once
  per PROBE_RETRY_SECONDS).
- **The law**: multiplicative steps toward the target, with a dead band. Decisions use answers that began once
  the window in force had taken effect (at most that many batch requests were in the engine): a narrower window
  only takes effect as batch requests already in the engine finish, since nothing is taken back. Every
  DECIDE_SAMPLES such answers (or, for the first cut, one more than twice the target: a streamed answer counts
  as soon as its tokens so far are that slow), their median ratio `r` decides. Above the target, the window narrows;
  below target × LOW it widens; in between it holds. Each change aims at target × AIM as if the ratio grew in
  proportion to the batch sequences beside the online request (`window × (aim − 1) / (r − 1)`, the shape of a
  CPU's step cost), clamped to [MIN_CUT, MAX_CUT] when narrowing and to at most MAX_GROWTH (and at least one
  more) when widening; starting open, the first cut is from the engine's running slots (vLLM's
  `max_num_seqs`, half the runner's window), since the rest of an open window only waits in vLLM's queue. A cut
  right after a widening goes back to the window that met the target first. Why not additive increase: each
  decision needs online answers that take seconds, and a narrower window a batch generation to act; steps of
  one or two requests would take minutes to find the window, while the proportional step lands within a few
  decisions and the clamps and the band keep noise from swinging it.
- **Narrowing must help, or it stops**: once a run of cuts has shrunk the window by FUTILE_SHRINK or more, the
  ratio must have fallen by at least FUTILE_GAIN of that share; if not (a GPU, or latency that comes from
  elsewhere), the window goes back to where the cuts began (open, usually) and stays at least that wide for
  FUTILE_HOLD_SECONDS. So on a GPU it settles wide open.

The controller only computes the window; `online.OnlineTraffic` applies it while online requests are being
answered and for HOLD_SECONDS after the last one (so an app's next request finds it in place), and lifts it
otherwise: with no online traffic, batch work is never narrowed. The window learned is kept for the next
online requests, and forgotten when another model is loaded.
"""

from __future__ import annotations

import collections
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Narrowing stays in force this long after the last online answer. An app that pauses between requests would
# otherwise find the engine refilled with batch work each time, and narrowing takes a batch generation's length
# to take effect again.
HOLD_SECONDS = 10.0
LOW = 0.8  # below target × LOW the window widens; between that and the target it holds
DECIDE_SAMPLES = 3
AIM = 0.9  # each change aims at target × AIM, inside the band
MIN_CUT, MAX_CUT = 0.25, 0.9
MAX_GROWTH = 2.0
FUTILE_SHRINK = 0.25
FUTILE_GAIN = 0.25
FUTILE_HOLD_SECONDS = 300.0
RECENT_RATIOS = 5  # the exported ratio: the median of this many latest answers beside batch work
IDLE_SAMPLES = 9
REFRESH_SECONDS = 1800.0
PROBE_SECONDS = 120.0
PROBE_RETRY_SECONDS = 600.0


@dataclass(frozen=True)
class Sample:
    """One successful online answer, as the controller sees it."""

    model: str
    endpoint: str
    seconds_per_token: float
    batch_at_start: int  # batch requests in the engine when it was admitted
    idle: bool  # no batch request was in the engine at any time while it ran


Key = tuple[str, str]  # (model, endpoint)


class LatencyController:
    def __init__(self, target: float, running: Callable[[], int], *, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`running`: the engine's sequence slots (what a full batch runs at once). Disabled (`--online-latency-
        target 0`, or `--online-batch-window` fixed), it still measures the baseline and the ratio."""
        self.target = target
        self.enabled = enabled and target > 0
        self._running = running
        self._clock = clock
        self.window: int | None = None  # learned; None: open
        self.ratio: float | None = None  # median of the latest ratios beside batch work
        self.changes: collections.Counter[str] = collections.Counter()  # narrow, widen, futile, probe
        self._idle: dict[Key, collections.deque[tuple[float, float]]] = {}  # (when, seconds per token)
        self._recent: collections.deque[float] = collections.deque(maxlen=RECENT_RATIOS)
        self._decide: list[float] = []
        self._cuts_from: tuple[int, float] | None = None  # (window, ratio) where a run of cuts began
        self._floor: tuple[int, float] | None = None  # (window, until): no narrower, narrowing did not help
        self._good: int | None = None  # the window at the last decision that met the target
        self._probe: tuple[Key, float] | None = None
        self._probed: dict[Key, float] = {}
        self._model: str | None = None

    # ---- what is read

    def limit(self) -> int | None:
        """Batch requests allowed in the engine while online requests are answered (None: no limit)."""
        if not self.enabled:
            return None
        if self._probe is not None:
            if self._clock() - self._probe[1] <= PROBE_SECONDS:
                return 0
            self._probe = None  # no online request came to run alone: try again later
        return self.window

    @property
    def probing(self) -> bool:
        return self.limit() == 0  # a learned window is never below 1

    def baseline(self, model: str, endpoint: str) -> float | None:
        samples = self._idle.get((model, endpoint))
        return statistics.median(s for _, s in samples) if samples else None

    def baselines(self) -> dict[Key, float]:
        return {key: statistics.median(s for _, s in samples) for key, samples in self._idle.items() if samples}

    # ---- what is told

    def observe(self, sample: Sample) -> None:
        now = self._clock()
        key = (sample.model, sample.endpoint)
        if sample.model != self._model:
            if self._model is not None:
                self._forget_window()  # another model: its steps cost differently
            self._model = sample.model
        if sample.idle:
            self._idle.setdefault(key, collections.deque(maxlen=IDLE_SAMPLES)).append((now, sample.seconds_per_token))
            if self._probe is not None and self._probe[0] == key:
                self._probe = None
            return
        samples = self._idle.get(key)
        if not samples:
            self._start_probe(key, now)
            return
        if now - samples[-1][0] > REFRESH_SECONDS:
            self._start_probe(key, now)  # measured long ago: the machine may be busier or freer now
        ratio = sample.seconds_per_token / statistics.median(s for _, s in samples)
        self._recent.append(ratio)
        self.ratio = statistics.median(self._recent)
        if not self.enabled or self._probe is not None:
            return
        if self.window is not None and sample.batch_at_start > self.window:
            return  # it began before the window in force took effect
        self._decide.append(ratio)
        if len(self._decide) < DECIDE_SAMPLES and not self._first_cut(ratio):
            return
        measured, count = statistics.median(self._decide), len(self._decide)
        self._decide.clear()
        self._step(measured, now, count)

    def observe_early(self, sample: Sample) -> bool:
        """A streamed answer still running, its tokens so far: acted on only for a first cut, when it is already
        more than twice the target (the first online requests beside a full batch take tens of seconds on a CPU;
        their end is too late to start narrowing). Whether the window changed."""
        samples = self._idle.get((sample.model, sample.endpoint))
        if not self.enabled or self._probe is not None or not samples or sample.model != self._model:
            return False
        if self.window is not None and sample.batch_at_start > self.window:
            return False
        ratio = sample.seconds_per_token / statistics.median(s for _, s in samples)
        if not self._first_cut(ratio):
            return False
        before = self.window
        self._decide.clear()
        self._step(ratio, self._clock(), 1)
        return self.window != before

    # ---- the law

    def _step(self, ratio: float, now: float, samples: int) -> None:
        """`ratio`: the median of `samples` answers. One very slow answer may narrow, but only a median of
        DECIDE_SAMPLES may judge that narrowing did not help: on a machine shared with other work single answers
        swing by several times (seen here: 1.5 × and 4.4 × idle a few seconds apart at one window)."""
        running = max(1, self._running())
        current = running if self.window is None else min(self.window, running)
        if ratio > self.target:
            if self._cuts_from is not None and samples >= DECIDE_SAMPLES:
                began, began_ratio = self._cuts_from
                shrunk = 1 - current / began
                if shrunk >= FUTILE_SHRINK and (began_ratio - ratio) / began_ratio < FUTILE_GAIN * shrunk:
                    self.window = None if began >= running else began
                    self._floor = (began, now + FUTILE_HOLD_SECONDS)
                    self._cuts_from = None
                    self.changes["futile"] += 1
                    log.info("online latency controller: narrowing batch work from %d to %d requests took online "
                             "requests from %.2f to %.2f × idle only: back to %s for %.0f s", began, current,
                             began_ratio, ratio, "open" if self.window is None else began, FUTILE_HOLD_SECONDS)
                    return
            floor = self._floor[0] if self._floor is not None and now < self._floor[1] else 0
            narrower = max(1, floor, int(current * min(MAX_CUT, max(MIN_CUT, self._scale(ratio)))))
            if self._good is not None and narrower < self._good < current:
                # Just widened from a window that met the target: back there first. A jump far beyond what the
                # few added requests explain is more likely the machine (other work on its cores) than the
                # batch, and the futility check needs that step to tell.
                narrower = self._good
            self._good = None
            if narrower >= current:
                return  # as narrow as it may go
            if self._cuts_from is None:
                self._cuts_from = (current, ratio)
            self.window = narrower
            self.changes["narrow"] += 1
            log.info("online latency controller: online requests at %.2f × idle (target %.2f): batch work narrowed "
                     "from %d to %d requests", ratio, self.target, current, narrower)
        elif ratio < self.target * LOW:
            self._cuts_from = None
            self._good = current
            if self.window is not None:
                wider = max(self.window + 1, int(self.window * min(MAX_GROWTH, self._scale(ratio))))
                log.info("online latency controller: online requests at %.2f × idle (target %.2f): batch work "
                         "widened from %d to %s", ratio, self.target, self.window,
                         "open" if wider >= running else f"{wider} requests")
                self.window = None if wider >= running else wider
                self.changes["widen"] += 1
        else:
            self._cuts_from = None  # within the band: settled
            self._good = current

    def _first_cut(self, ratio: float) -> bool:
        """Whether one answer suffices: one more than twice the target, not already cutting. Beside a full
        batch the first cut cannot come soon enough; the next ones wait for a median of DECIDE_SAMPLES."""
        return ratio > 2 * self.target and self._cuts_from is None

    def _scale(self, ratio: float) -> float:
        """What the window is multiplied by to bring the ratio to target × AIM, were it to grow in proportion to
        the batch sequences beside (1 with none: a CPU's step cost, roughly)."""
        return (self.target * AIM - 1) / max(ratio - 1, 1e-3)

    def _start_probe(self, key: Key, now: float) -> None:
        last = self._probed.get(key)
        if not self.enabled or self._probe is not None or (last is not None and now - last < PROBE_RETRY_SECONDS):
            return
        self._probe = (key, now)
        self._probed[key] = now
        self.changes["probe"] += 1
        log.info("online latency controller: no idle latency measured yet for %s %s: batch work pauses until an "
                 "online request has run alone (at most %.0f s)", key[0], key[1], PROBE_SECONDS)

    def _forget_window(self) -> None:
        self.window = None
        self._recent.clear()
        self._decide.clear()
        self._cuts_from = None
        self._floor = None
        self._good = None
        self._probe = None
        self.ratio = None
