"""How many requests one backend gets at once: its window grows while it answers well and shrinks when it
struggles, never past the cap the operator gave (`--backend URL,window=N`).

- Start small (a quarter of the cap) and add one request per answer (doubling every round trip, like TCP's slow
  start) until the cap or the first sign of trouble; after that, add one request per round trip.
- A failed attempt (429, 5xx, a timeout) halves the window, at most once per round trip (a burst of failures
  from one overload is one signal, not thirty).
- Latency: a sudden slowdown shrinks it by a tenth. "Sudden" compares the latest answers with the backend's
  longer history (time per output token, so long and short generations compare), not with its best time:
  an engine that batches answers each request more slowly as its batch grows while finishing more per second,
  so the latency of a fuller batch is not a reason to stop filling it; only a jump is (another tenant started
  loading the backend, or a node degraded).

Faster backends get more work without any of this: a window slot frees sooner on a faster backend.
"""

from __future__ import annotations

# The short-term average against the long-term one: above this ratio the backend slowed down suddenly.
SLOWDOWN_RATIO = 2.0
SHORT_WEIGHT = 0.2  # about the last 5 answers
LONG_WEIGHT = 0.02  # about the last 50
MIN_SAMPLES = 20  # before this many answers, there is no history to compare with
SLOWDOWN_FACTOR = 0.9
FAILURE_FACTOR = 0.5


class Window:
    def __init__(self, cap: int, *, adaptive: bool = True) -> None:
        self.cap = max(1, cap)
        self.adaptive = adaptive
        self._limit = 0.0
        self._slow_start = True
        self._short = 0.0
        self._long = 0.0
        self._samples = 0
        self._since_decrease = 0
        self.reset()

    @property
    def limit(self) -> int:
        return max(1, min(self.cap, int(self._limit)))

    def resize(self, cap: int) -> None:
        """A new cap (an engine that reports its capacity once started)."""
        self.cap = max(1, cap)
        if not self.adaptive:
            self._limit = float(self.cap)

    def reset(self) -> None:
        """Back to a small window: a backend coming back into rotation has to show it is healthy again."""
        self._limit = float(self.cap) if not self.adaptive else float(max(1, self.cap // 4))
        self._slow_start = True
        self._short = self._long = 0.0
        self._samples = 0
        self._since_decrease = 0

    def on_success(self, seconds: float, output_tokens: int) -> None:
        if not self.adaptive:
            return
        pace = seconds / (1 + max(0, output_tokens))
        if self._samples == 0:
            self._short = self._long = pace
        else:
            self._short += SHORT_WEIGHT * (pace - self._short)
            self._long += LONG_WEIGHT * (pace - self._long)
        self._samples += 1
        self._since_decrease += 1
        if self._samples >= MIN_SAMPLES and self._short > SLOWDOWN_RATIO * self._long:
            self._decrease(SLOWDOWN_FACTOR)
            return
        self._limit += 1.0 if self._slow_start else 1.0 / max(1.0, self._limit)
        self._limit = min(self._limit, float(self.cap))

    def on_failure(self) -> None:
        if self.adaptive:
            self._since_decrease += 1
            self._decrease(FAILURE_FACTOR)

    def _decrease(self, factor: float) -> None:
        # Once per round trip: the answers already in flight when trouble began carry no new information.
        if self._since_decrease < self.limit and not self._slow_start:
            return
        self._slow_start = False
        self._since_decrease = 0
        self._limit = max(1.0, self._limit * factor)
