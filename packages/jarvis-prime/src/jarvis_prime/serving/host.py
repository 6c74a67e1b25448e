"""`ModelHost`: the one model a server serves, swapped without failing a request.

A swap points new requests at the new model; requests already running finish on the
old one, which is closed when the last of them is done (a model holds gigabytes and
open files: a server that swaps often must not keep them all). A model handed in by
the caller (`owned=False`, e.g. a test's fixture) is the caller's to close.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from jarvis_prime.serving.errors import APIError

if TYPE_CHECKING:
    from jarvis_prime.models.prime_model import PrimeModel


@dataclass
class Slot:
    """One loaded model and how many requests are using it."""

    model: "PrimeModel | Any"  # anything with name, version and close() (jarvis serves remote models too)
    name: str
    owned: bool = True
    created: int = field(default_factory=lambda: int(time.time()))
    users: int = 0
    retired: bool = False

    def fingerprint(self) -> str:
        """Which model and version answered (the served name may stay the same across swaps)."""
        return f"{self.model.name}-{self.model.version}"


class ModelHost:
    """The served model: `use` it per request, `swap` it any time, `close` at shutdown."""

    def __init__(self) -> None:
        self._slot: Slot | None = None
        self._lock = threading.Lock()
        self.error: str | None = None  # why the first model failed to load, until one loads

    @property
    def current(self) -> Slot | None:
        return self._slot

    @contextmanager
    def use(self) -> Iterator[Slot]:
        """The current model, kept open until the block ends (a 503 while none is loaded)."""
        with self._lock:
            slot = self._slot
            if slot is None:
                message = f"model not loaded: {self.error}" if self.error else "model still loading"
                raise APIError(503, message, type_="server_error", code="model_not_ready")
            slot.users += 1
        try:
            yield slot
        finally:
            with self._lock:
                slot.users -= 1
                close = slot.retired and slot.users == 0
            if close:
                _close(slot)

    def swap(self, model: "PrimeModel | Any", name: str, *, owned: bool = True) -> None:
        """Serve `model` from now on; the old one closes once its last request is done."""
        self._replace(Slot(model, name, owned))

    def offer(self, model: "PrimeModel | Any", name: str) -> bool:
        """Serve `model` only if nothing is served yet (a background first load that a
        swap overtook loses); a model not taken is closed. True if taken."""
        with self._lock:
            taken = self._slot is None
            if taken:
                self._slot, self.error = Slot(model, name), None
        if not taken:
            _close(Slot(model, name))
        return taken

    def close(self) -> None:
        self._replace(None)

    def _replace(self, slot: Slot | None) -> None:
        with self._lock:
            old, self._slot = self._slot, slot
            if slot is not None:
                self.error = None
            if old is not None:
                old.retired = True
            close = old is not None and old.users == 0
        if close:
            _close(old)


def _close(slot: Slot) -> None:
    if slot.owned:
        slot.model.close()
