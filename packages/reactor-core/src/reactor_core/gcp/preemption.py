"""Noticing that the machine is about to go away.

Two sources set the same flag: SIGTERM/SIGINT (what systemd, Kubernetes, SkyPilot and
GCE's shutdown send), and the GCP metadata server's `instance/preempted`, long-polled
by a daemon thread so the loop hears about a spot preemption when the notice is
posted, ~30 s before the ACPI shutdown. The loop checks the flag at each step
boundary and between eval batches and samples, writes an emergency checkpoint and
exits with `EXIT_PREEMPTED`.
"""

from __future__ import annotations

import logging
import signal
import threading
import urllib.request
from types import FrameType

from reactor_core.gcp.metadata import MetadataClient

log = logging.getLogger("reactor_core")

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry".
# Distinct from 0 (done), 1 (error) and 2 (bad config/data), so a supervisor can
# restart on exactly this code (systemd: RestartForceExitStatus=75).
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """Raised by the loop after the emergency checkpoint; the process should exit 75."""

    def __init__(self, step: int, checkpoint: str | None, reason: str) -> None:
        super().__init__(f"preempted at step {step} ({reason}); checkpoint: {checkpoint}")
        self.step, self.checkpoint, self.reason = step, checkpoint, reason

    def __reduce__(self):  # picklable across train_async's process boundary
        return (Preempted, (self.step, self.checkpoint, self.reason))


class PreemptionGuard:
    """Context manager: signal handlers + optional metadata watcher -> `triggered`."""

    def __init__(self, metadata_url: str | None = None, poll_timeout_s: float = 60.0) -> None:
        """metadata_url: the full `instance/preempted?wait_for_change=true` URL, or None."""
        self.triggered = threading.Event()
        self.reason = ""
        self.metadata_url = metadata_url
        self.poll_timeout_s = poll_timeout_s
        self._previous: dict[int, object] = {}
        self._stop = threading.Event()

    def trigger(self, reason: str) -> None:
        if not self.triggered.is_set():
            self.reason = reason
            log.warning("preemption notice (%s): checkpointing at the end of this step or eval batch", reason)
            self.triggered.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.triggered.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.trigger(signal.Signals(signum).name)

    def _watch_metadata(self) -> None:
        """Long-poll `instance/preempted`, passing the last ETag back.

        With `last_etag`, the server answers at once if the value changed since that
        version, so a notice posted while we were reconnecting is not missed.
        """
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        etag = "0"  # matches no version: the first answer is the current value, at once
        while not self._stop.is_set():
            url = f"{self.metadata_url}&last_etag={etag}" if "?" in self.metadata_url else self.metadata_url
            try:
                request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
                with opener.open(request, timeout=self.poll_timeout_s) as response:
                    etag = response.headers.get("ETag", etag)
                    if response.read().decode().strip().upper() == "TRUE":
                        self.trigger("GCP preemption notice")
                        return
            except Exception:  # timeouts, resets, truncated bodies: retry, never die or spin
                if self._stop.wait(1.0):
                    return

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        if self.metadata_url:
            threading.Thread(target=self._watch_metadata, name="gcp-preemption-watcher", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def preemption_guard(watch_gcp: bool) -> PreemptionGuard:
    """Signals always; the GCP notice too when `watch_gcp` (at `GCE_METADATA_HOST` when set)."""
    url = MetadataClient.from_env().url("instance/preempted?wait_for_change=true")
    return PreemptionGuard(url if watch_gcp else None)
