"""Environment detection, profile rules and `reactor env`.

Local probes are injected as fakes; the GCP metadata client is exercised against a real
HTTP server on 127.0.0.1 that speaks the metadata protocol, so the request, the header
check and the failure paths run for real without leaving the machine.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reactor_core import __version__
from reactor_core.cli import app
from reactor_core.env import (
    Environment,
    GpuInfo,
    PlatformInfo,
    Probes,
    _linux_ram_bytes,
    detect_environment,
    recommend_profile,
)
from reactor_core.gcp.metadata import NOT_ON_GCP, GcpInfo, MetadataClient, detect_gcp

GiB = 2**30

SPOT_VM_METADATA = {
    "instance/machine-type": "projects/123456/machineTypes/n2-highmem-8",
    "instance/zone": "projects/123456/zones/us-central1-a",
    "instance/scheduling/preemptible": "TRUE",
    "instance/scheduling/provisioning-model": "SPOT",
}


@pytest.fixture(autouse=True)
def _clean_metadata_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The developer's shell must not decide what these tests see.
    monkeypatch.delenv("REACTOR_NO_GCP_PROBE", raising=False)
    monkeypatch.delenv("GCE_METADATA_HOST", raising=False)


# --------------------------------------------------------------------------------------
# A loopback metadata server
# --------------------------------------------------------------------------------------


@dataclass
class FakeMetadataServer:
    values: dict[str, str]
    send_flavor: bool = True
    paths: list[str] = field(default_factory=list)
    host: str = ""


@contextmanager
def metadata_server(
    values: dict[str, str], send_flavor: bool = True
) -> Iterator[FakeMetadataServer]:
    """Serve `values` under /computeMetadata/v1/ like GCE does.

    Requests without `Metadata-Flavor: Google` get 403, unknown keys 404; replies carry
    the flavor header unless `send_flavor` is False (an impostor server).
    """
    state = FakeMetadataServer(values=values, send_flavor=send_flavor)
    prefix = "/computeMetadata/v1/"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            state.paths.append(self.path)
            key = self.path[len(prefix) :] if self.path.startswith(prefix) else None
            if self.headers.get("Metadata-Flavor") != "Google":
                self._reply(403, "Missing Metadata-Flavor:Google header.")
            elif key not in state.values:
                self._reply(404, "not found")
            else:
                self._reply(200, state.values[key])

        def _reply(self, status: int, body: str) -> None:
            data = body.encode()
            self.send_response(status)
            if state.send_flavor:
                self.send_header("Metadata-Flavor", "Google")
            self.send_header("Content-Type", "application/text")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # A short poll interval keeps shutdown() (and so each test) fast.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.host = f"127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def closed_port_host() -> str:
    """A loopback address nothing listens on: connecting is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


# --------------------------------------------------------------------------------------
# Fake local probes
# --------------------------------------------------------------------------------------


def fake_probes(
    *,
    os: str = "Linux",
    arch: str = "x86_64",
    ram_bytes: int | None = 16 * GiB,
    gpus: tuple[GpuInfo, ...] = (),
    mps: bool = False,
    metadata: dict[str, str] | None = None,
) -> Probes:
    metadata = metadata or {}
    return Probes(
        platform=lambda: PlatformInfo(os=os, arch=arch, python="3.11.7", cpu_count=8),
        ram_bytes=lambda: ram_bytes,
        torch_version=lambda: "2.13.0",
        cuda_gpus=lambda: gpus,
        mps_available=lambda: mps,
        metadata_get=metadata.get,
    )


# --------------------------------------------------------------------------------------
# Profiles from injected probes
# --------------------------------------------------------------------------------------


def test_apple_silicon_16gb_gets_inference_and_small_lora() -> None:
    env = detect_environment(fake_probes(os="Darwin", arch="arm64", ram_bytes=16 * GiB, mps=True))

    assert env.apple_silicon and env.mps_available
    assert env.ram_gb == pytest.approx(17.2)
    assert env.gcp == NOT_ON_GCP
    profile = recommend_profile(env)
    assert profile.name == "apple-silicon-lora"
    assert "inference + small LoRA" in profile.reason
    assert (profile.device, profile.max_trainable) == ("mps", "lora")
    assert profile.auto_resume is False and profile.checkpoint_every_minutes is None


def test_apple_silicon_8gb_is_inference_only() -> None:
    env = detect_environment(fake_probes(os="Darwin", arch="arm64", ram_bytes=8 * GiB, mps=True))

    profile = recommend_profile(env)
    assert (profile.name, profile.max_trainable) == ("apple-silicon-inference", "inference")


def test_intel_mac_is_not_apple_silicon() -> None:
    env = detect_environment(fake_probes(os="Darwin", arch="x86_64", ram_bytes=32 * GiB))

    assert not env.apple_silicon
    assert recommend_profile(env).name == "cpu-lora"


def test_cuda_80gb_gets_full_training() -> None:
    env = detect_environment(
        fake_probes(ram_bytes=128 * GiB, gpus=(GpuInfo("NVIDIA A100-SXM4-80GB", 85.1),))
    )

    assert env.total_gpu_memory_gb == pytest.approx(85.1)
    profile = recommend_profile(env)
    assert (profile.name, profile.device, profile.max_trainable) == ("cuda-full", "cuda", "full")


def test_small_cuda_gpu_gets_lora() -> None:
    env = detect_environment(fake_probes(gpus=(GpuInfo("NVIDIA T4", 15.8),)))

    profile = recommend_profile(env)
    assert (profile.name, profile.max_trainable) == ("cuda-lora", "lora")


def test_gpu_memory_is_summed_across_devices() -> None:
    two_t4 = (GpuInfo("NVIDIA T4", 15.8), GpuInfo("NVIDIA T4", 15.8))
    env = detect_environment(fake_probes(gpus=two_t4))

    assert recommend_profile(env).max_trainable == "full"


def test_spot_gcp_vm_turns_on_auto_resume_and_5_minute_checkpoints() -> None:
    env = detect_environment(fake_probes(ram_bytes=64 * GiB, metadata=SPOT_VM_METADATA))

    assert env.gcp == GcpInfo(
        on_gcp=True,
        machine_type="n2-highmem-8",
        zone="us-central1-a",
        preemptible=True,
        provisioning_model="SPOT",
    )
    profile = recommend_profile(env)
    assert profile.name == "gcp-full-spot"
    assert profile.max_trainable == "full"
    assert profile.auto_resume is True
    assert profile.checkpoint_every_minutes == 5


def test_spot_overlays_any_base_profile() -> None:
    env = detect_environment(
        fake_probes(gpus=(GpuInfo("NVIDIA L4", 24.2),), metadata=SPOT_VM_METADATA)
    )

    profile = recommend_profile(env)
    assert profile.name == "cuda-full-spot"
    assert profile.auto_resume and profile.checkpoint_every_minutes == 5


def test_spot_is_detected_from_provisioning_model_alone() -> None:
    metadata = {**SPOT_VM_METADATA, "instance/scheduling/preemptible": "FALSE"}

    assert detect_gcp(metadata.get).preemptible is True


def test_small_standard_gcp_vm_is_cpu_lora_without_auto_resume() -> None:
    metadata = {
        **SPOT_VM_METADATA,
        "instance/scheduling/preemptible": "FALSE",
        "instance/scheduling/provisioning-model": "STANDARD",
    }
    env = detect_environment(fake_probes(ram_bytes=16 * GiB, metadata=metadata))

    assert env.gcp.on_gcp and not env.gcp.preemptible
    profile = recommend_profile(env)
    assert (profile.name, profile.auto_resume) == ("cpu-lora", False)


def test_unknown_ram_does_not_crash_the_rules() -> None:
    env = detect_environment(fake_probes(ram_bytes=None))

    assert env.ram_gb is None
    assert recommend_profile(env).name == "cpu-lora"


def test_environment_and_profile_round_trip_to_json() -> None:
    env = detect_environment(fake_probes(gpus=(GpuInfo("NVIDIA H100", 85.0),)))

    payload = {"env": env.to_dict(), "profile": recommend_profile(env).to_dict()}
    data = json.loads(json.dumps(payload))
    assert data["env"]["cuda_gpus"] == [{"name": "NVIDIA H100", "memory_gb": 85.0}]
    assert data["profile"]["max_trainable"] == "full"


def test_linux_ram_is_capped_by_the_container_limit(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       65536000 kB\nMemFree:        1000 kB\n")
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    v2.write_text("max\n")
    v1.write_text("9223372036854771712\n")

    assert _linux_ram_bytes(meminfo, (v2, v1)) == 65536000 * 1024
    v2.write_text(f"{8 * GiB}\n")
    assert _linux_ram_bytes(meminfo, (v2, v1)) == 8 * GiB


# --------------------------------------------------------------------------------------
# The metadata client against a real loopback server
# --------------------------------------------------------------------------------------


def test_metadata_client_detects_gcp_over_http(monkeypatch: pytest.MonkeyPatch) -> None:
    with metadata_server(SPOT_VM_METADATA) as server:
        monkeypatch.setenv("GCE_METADATA_HOST", server.host)
        gcp = detect_gcp(MetadataClient.from_env(timeout_s=2.0).get)

    assert gcp == GcpInfo(
        on_gcp=True,
        machine_type="n2-highmem-8",
        zone="us-central1-a",
        preemptible=True,
        provisioning_model="SPOT",
    )
    assert server.paths[0] == "/computeMetadata/v1/instance/machine-type"


def test_missing_keys_are_none_not_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    # An older VM without the provisioning-model key: 404 for that one key only.
    values = {k: v for k, v in SPOT_VM_METADATA.items() if "provisioning-model" not in k}
    with metadata_server(values) as server:
        monkeypatch.setenv("GCE_METADATA_HOST", server.host)
        gcp = detect_gcp(MetadataClient.from_env(timeout_s=2.0).get)

    assert gcp.on_gcp and gcp.preemptible and gcp.provisioning_model is None


def test_server_without_flavor_header_is_not_gcp(monkeypatch: pytest.MonkeyPatch) -> None:
    with metadata_server(SPOT_VM_METADATA, send_flavor=False) as server:
        monkeypatch.setenv("GCE_METADATA_HOST", server.host)
        gcp = detect_gcp(MetadataClient.from_env(timeout_s=2.0).get)

    assert gcp == NOT_ON_GCP
    assert len(server.paths) == 1, "off GCP only the first key may be asked"


def test_unreachable_metadata_host_returns_none_quickly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GCE_METADATA_HOST", closed_port_host())
    start = time.monotonic()

    gcp = detect_gcp(MetadataClient.from_env(timeout_s=0.5).get)

    assert gcp == NOT_ON_GCP
    assert time.monotonic() - start < 5.0


def test_silent_metadata_host_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # Accepts the connection (the kernel completes the handshake) and never answers.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{listener.getsockname()[1]}")
        start = time.monotonic()

        gcp = detect_gcp(MetadataClient.from_env(timeout_s=0.2).get)

        assert gcp == NOT_ON_GCP
        assert time.monotonic() - start < 2.0


def test_no_gcp_probe_env_var_skips_the_request(monkeypatch: pytest.MonkeyPatch) -> None:
    with metadata_server(SPOT_VM_METADATA) as server:
        monkeypatch.setenv("GCE_METADATA_HOST", server.host)
        monkeypatch.setenv("REACTOR_NO_GCP_PROBE", "1")
        gcp = detect_gcp(MetadataClient.from_env().get)

    assert gcp == NOT_ON_GCP
    assert server.paths == []


def test_metadata_client_ignores_http_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy that does not exist: going through it would fail the request.
    monkeypatch.setenv("http_proxy", closed_port_host())
    monkeypatch.setenv("HTTP_PROXY", closed_port_host())
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with metadata_server(SPOT_VM_METADATA) as server:
        client = MetadataClient(host=server.host, timeout_s=2.0)
        assert client.get("instance/zone") == "projects/123456/zones/us-central1-a"


def test_metadata_client_url_uses_the_host() -> None:
    client = MetadataClient(host="10.0.0.1:8080")
    assert client.url("instance/zone") == "http://10.0.0.1:8080/computeMetadata/v1/instance/zone"


# --------------------------------------------------------------------------------------
# `reactor` CLI
# --------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_env_json_reports_the_spot_vm(monkeypatch: pytest.MonkeyPatch) -> None:
    with metadata_server(SPOT_VM_METADATA) as server:
        monkeypatch.setenv("GCE_METADATA_HOST", server.host)
        result = runner.invoke(app, ["env", "--json", "--metadata-timeout", "2"])

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["reactor_core"] == __version__
    environment, profile = data["environment"], data["profile"]
    assert set(environment) == set(Environment.__dataclass_fields__)
    assert environment["gcp"] == {
        "on_gcp": True,
        "machine_type": "n2-highmem-8",
        "zone": "us-central1-a",
        "preemptible": True,
        "provisioning_model": "SPOT",
    }
    assert environment["cpu_count"] >= 1
    assert profile["name"].endswith("-spot")
    assert profile["auto_resume"] is True
    assert profile["checkpoint_every_minutes"] == 5


def test_cli_env_prints_table_and_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GCE_METADATA_HOST", closed_port_host())
    monkeypatch.setenv("COLUMNS", "120")

    result = runner.invoke(app, ["env"])

    assert result.exit_code == 0, result.output
    assert "Environment" in result.output and "GCP VM" in result.output
    # The command ran the real local probes; the same probes name the same profile.
    expected = recommend_profile(detect_environment(Probes(metadata_get=lambda path: None)))
    assert f"Recommended profile: {expected.name}" in result.output


def test_cli_version() -> None:
    result = runner.invoke(app, ["--version"])

    assert result.exit_code == 0
    assert result.stdout.strip() == f"reactor-core {__version__}"


def test_cli_without_arguments_shows_help() -> None:
    result = runner.invoke(app, [])

    assert "env" in result.output and "training engine" in result.output
