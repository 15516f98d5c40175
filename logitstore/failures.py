"""When a dump should stop rather than go on failing: most of its images do not read or decode."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from .errors import CorpusError

# A dump judges its failure share once it has read this many images (and stops at once if all of them failed).
FAILURE_CHECK_AFTER = 1000


@dataclass
class FailureWatch:
    """Stops a dump whose images mostly fail (the wrong --images, a missing --image-column's bytes, an
    unreachable bucket) with one line naming the first reasons, rather than writing an empty store."""

    images: str
    max_share: float = 0.5
    # What a stop leaves behind, asked when it stops (a dump still listing its corpus has written nothing);
    # None: a store, left incomplete.
    left: Callable[[], str] | None = None
    seen: int = 0
    failed: int = 0
    reasons: list[str] = field(default_factory=list)

    def add(self, n_ok: int, failures: Sequence[tuple[int, str, str]]) -> None:
        self.seen += n_ok + len(failures)
        self.failed += len(failures)
        self.reasons += [f"{image_id}: {reason}" for _, image_id, reason in failures][:max(0, 3 - len(self.reasons))]
        if self.seen >= FAILURE_CHECK_AFTER and self.failed == self.seen:
            self.stop(f"all of the first {self.seen:,} images failed")
        if self.seen >= FAILURE_CHECK_AFTER and self.failed > self.max_share * self.seen:
            self.stop(f"{self.failed:,} of the first {self.seen:,} images failed, more than --max-failure-share "
                      f"{self.max_share:g}")

    def finish(self, rows_before: int) -> None:
        if self.seen and self.failed == self.seen and rows_before == 0:
            self.stop(f"all {self.seen:,} images failed")

    def stop(self, what: str) -> None:
        left = self.left() if self.left is not None else "the store is left incomplete"
        # Raising the share cannot help when every image failed: that is the corpus or the flags
        fix = "" if self.failed == self.seen else ", or raise --max-failure-share"
        raise CorpusError(f"{self.images}: {what} (first: {'; '.join(self.reasons)}); {left}. "
                          f"Check --images (and --image-column){fix}")
