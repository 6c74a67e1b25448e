"""The GCE metadata server: is this a GCP VM, is it spot, and where to long-poll.

Used by `reactor env` (what machine is this?), by the recipes' spot defaults, and by the
preemption watcher (`gcp/preemption.py`), which long-polls `instance/preempted` at
`MetadataClient.url(...)`.
"""

from __future__ import annotations

import http.client
import os
import threading
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class GcpInfo:
    """What the GCE metadata server says about this VM (all empty off GCP).

    `preemptible` is true for both flavours of reclaimable VM: legacy preemptible VMs
    (`instance/scheduling/preemptible` == "TRUE") and Spot VMs (provisioning model
    "SPOT"). Training treats them the same way: the VM can vanish with ~30 s notice.
    """

    on_gcp: bool
    machine_type: str | None = None
    zone: str | None = None
    preemptible: bool = False
    provisioning_model: str | None = None


NOT_ON_GCP = GcpInfo(on_gcp=False)

MetadataGetter = Callable[[str], str | None]

DEFAULT_METADATA_HOST = "metadata.google.internal"
DEFAULT_METADATA_TIMEOUT_S = 0.5
METADATA_FLAVOR_HEADER = "Metadata-Flavor"
METADATA_FLAVOR = "Google"

# The first key doubles as the "are we on GCP?" ping: every VM has a machine type.
_GCP_PING_KEY = "instance/machine-type"
_GCP_ZONE_KEY = "instance/zone"
_GCP_PREEMPTIBLE_KEY = "instance/scheduling/preemptible"
# The metadata server spells it with a dash; the Compute API's JSON calls the same
# field `scheduling.provisioningModel`.
_GCP_PROVISIONING_MODEL_KEY = "instance/scheduling/provisioning-model"

# The metadata server is link-local: never route it through an HTTP(S)_PROXY.
_DIRECT_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class MetadataClient:
    """A tiny, never-raising client for the GCE metadata server.

    `host` follows google-auth's `GCE_METADATA_HOST` so the same override that points
    Google's libraries at an emulator points us there too (the tests use a loopback
    server). A response only counts when it carries `Metadata-Flavor: Google`; anything
    else (a captive portal, a proxy, some other service on that name) means "not GCP".
    """

    host: str = DEFAULT_METADATA_HOST
    timeout_s: float = DEFAULT_METADATA_TIMEOUT_S
    enabled: bool = True

    @classmethod
    def from_env(
        cls,
        timeout_s: float = DEFAULT_METADATA_TIMEOUT_S,
        environ: Mapping[str, str] | None = None,
    ) -> MetadataClient:
        """Read `GCE_METADATA_HOST` and `REACTOR_NO_GCP_PROBE` (1/true/yes disables)."""
        environ = os.environ if environ is None else environ
        disabled = environ.get("REACTOR_NO_GCP_PROBE", "").strip().lower() in {"1", "true", "yes"}
        return cls(
            host=environ.get("GCE_METADATA_HOST") or DEFAULT_METADATA_HOST,
            timeout_s=timeout_s,
            enabled=not disabled,
        )

    def url(self, path: str) -> str:
        return f"http://{self.host}/computeMetadata/v1/{path.lstrip('/')}"

    def get(self, path: str) -> str | None:
        """Return the value at `path`, or None for any failure (off GCP, 404, timeout).

        urllib's timeout covers connect and read but not the DNS lookup, and resolving
        `metadata.google.internal` off GCP can hang for seconds on some networks. So the
        request runs in a daemon thread and we stop waiting after `timeout_s` in total;
        a lookup still hanging is abandoned and dies with the process.
        """
        if not self.enabled:
            return None
        result: list[str | None] = []
        worker = threading.Thread(target=lambda: result.append(self._fetch(path)), daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        return result[0] if result else None

    def _fetch(self, path: str) -> str | None:
        headers = {METADATA_FLAVOR_HEADER: METADATA_FLAVOR}
        request = urllib.request.Request(self.url(path), headers=headers)
        try:
            with _DIRECT_OPENER.open(request, timeout=self.timeout_s) as response:
                if response.headers.get(METADATA_FLAVOR_HEADER) != METADATA_FLAVOR:
                    return None
                return response.read().decode("utf-8")
        # URLError, HTTPError (404 for a missing key), timeouts and refused connections
        # are all OSError; a garbled reply is an HTTPException; a bad host or non-UTF-8
        # body is a ValueError.
        except (OSError, http.client.HTTPException, ValueError):
            return None


def detect_gcp(get: MetadataGetter) -> GcpInfo:
    """Ask the metadata server about this VM, one request only when it isn't there.

    Off GCP the ping fails after one short timeout and nothing else is asked; the
    remaining keys are fetched only once the server has answered.
    """
    machine_type = get(_GCP_PING_KEY)
    if machine_type is None:
        return NOT_ON_GCP
    zone = get(_GCP_ZONE_KEY)
    preemptible = _clean(get(_GCP_PREEMPTIBLE_KEY))
    provisioning_model = _clean(get(_GCP_PROVISIONING_MODEL_KEY))
    return GcpInfo(
        on_gcp=True,
        # Both come back as resource paths: "projects/123/machineTypes/a2-highgpu-1g".
        machine_type=_last_segment(machine_type),
        zone=_last_segment(zone),
        preemptible=(preemptible or "").upper() == "TRUE"
        or (provisioning_model or "").upper() == "SPOT",
        provisioning_model=provisioning_model,
    )


def _clean(value: str | None) -> str | None:
    value = value.strip() if value is not None else None
    return value or None


def _last_segment(value: str | None) -> str | None:
    value = _clean(value)
    return value.rsplit("/", 1)[-1] if value else None
