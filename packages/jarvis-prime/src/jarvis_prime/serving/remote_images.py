"""Remote images for `prime serve --allow-remote-images`: an `image_url` part's http(s) URL
fetched by the server, bounded in every way a client could abuse it.

A server that fetches URLs for its clients makes requests with its own network position,
so the default refuses every address that is not public (loopback, private, link-local,
shared, reserved: server-side request forgery). The host is resolved here, every address
it resolves to is checked, and the connection goes to a checked address (the URL's host
still names the TLS server and the Host header), so a DNS answer that changes between the
check and the connect (rebinding) cannot slip through. Redirects are followed by hand, each
hop checked the same way. The body is counted as it streams and the download stops at the
byte limit; a compressed body is refused rather than inflated (a small gzip can hold a huge
image). Every refusal is a 4xx naming the part, `messages[i].content[j]`.

`allow_private` (`--allow-private-image-hosts`) admits loopback and private (RFC 1918,
unique-local) addresses, for images served on a LAN; link-local addresses (the cloud
metadata server at 169.254.169.254 among them) stay refused either way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from jarvis_prime.serving.errors import APIError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class FetchPolicy:
    """How far the server goes for one remote image."""

    max_bytes: int
    allow_private: bool = False
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0  # the longest wait for any one read
    total_timeout_s: float = 30.0  # the whole download, redirects included
    max_redirects: int = 3


def address_refusal(address: IPAddress, allow_private: bool = False) -> str | None:
    """Why the server must not connect to `address`, or None when it may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if address.is_link_local:
        return "a link-local address (the cloud metadata server lives there), never fetched"
    if address.is_multicast or address.is_unspecified:
        return "not a host address"
    if address.is_global:
        return None
    if allow_private and (address.is_loopback or address.is_private):
        return None
    kind = "a loopback" if address.is_loopback else "a private" if address.is_private else "a non-public"
    hint = "" if allow_private else " (--allow-private-image-hosts lets a server fetch from its own network)"
    return f"{kind} address, refused{hint}"


def _fail(where: str, message: str, code: str, status: int = 400) -> APIError:
    return APIError(status, f"{where}: {message}", param=where, code=code)


async def _checked_addresses(host: str, port: int, where: str, policy: FetchPolicy) -> list[str]:
    """Every address `host` resolves to, each one checked; any refused one refuses the host
    (a name that also points inward is not fetched from)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise _fail(where, f"cannot resolve the image host {host!r} ({err})", "image_fetch_failed") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for text in addresses:
        refusal = address_refusal(ipaddress.ip_address(text.partition("%")[0]), policy.allow_private)
        if refusal:
            raise _fail(where, f"the image host {host!r} resolves to {text}: {refusal}", "image_host_refused")
    return addresses


async def _open(client: Any, url: Any, where: str, policy: FetchPolicy) -> Any:
    """A streamed GET of `url`, connected to one of its host's checked addresses."""
    import httpx2

    host = url.raw_host.decode("ascii")  # IDNA-encoded, as DNS and TLS take it
    addresses = await _checked_addresses(host, url.port or (443 if url.scheme == "https" else 80), where, policy)
    failure: Exception | None = None
    for address in addresses:
        request = client.build_request("GET", url.copy_with(host=address),
                                       headers={"Host": url.netloc.decode("ascii"), "Accept": "image/*",
                                                "Accept-Encoding": "identity"},
                                       extensions={"sni_hostname": host})
        try:
            return await client.send(request, stream=True, follow_redirects=False)
        except httpx2.ConnectError as err:  # the next address may answer
            failure = err
    if failure is None:
        raise _fail(where, f"the image host {host!r} resolves to no address", "image_fetch_failed")
    raise failure


def _check_scheme(url: Any, where: str) -> None:
    if url.scheme not in ("http", "https"):
        raise _fail(where, f"only http and https image URLs are fetched, not {url.scheme}:", "invalid_image_url")


async def _download(client: Any, url: Any, where: str, policy: FetchPolicy) -> bytes:
    for _ in range(policy.max_redirects + 1):
        _check_scheme(url, where)
        response = await _open(client, url, where, policy)
        try:
            if response.is_redirect and "location" in response.headers:
                url = url.join(response.headers["location"])
                continue
            return await _body(response, where, policy)
        finally:
            await response.aclose()
    raise _fail(where, f"the image URL redirects more than {policy.max_redirects} times", "image_fetch_failed")


async def _body(response: Any, where: str, policy: FetchPolicy) -> bytes:
    """The body, counted as it arrives: the download stops once it passes `max_bytes`."""
    if response.status_code != 200:
        raise _fail(where, f"the image URL answered HTTP {response.status_code}", "image_fetch_failed")
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind and not (kind.startswith("image/") or kind == "application/octet-stream"):
        raise _fail(where, f"the image URL answered {kind}, not an image", "invalid_image")
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise _fail(where, f"the image URL answered a {encoding}-compressed body; images are fetched uncompressed",
                    "invalid_image")
    declared = response.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else 0
    chunks: list[bytes] = []
    if size <= policy.max_bytes:
        size = 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > policy.max_bytes:
                break
            chunks.append(chunk)
        else:
            return b"".join(chunks)
    shown = f"{size}" if declared.isdigit() else f"more than {policy.max_bytes}"
    raise _fail(where, f"the image is {shown} bytes, over this server's limit of {policy.max_bytes} bytes per image "
                "(--max-image-bytes)", "image_too_large", 413)


def _timeout(where: str, policy: FetchPolicy) -> APIError:
    return _fail(where, f"the image URL did not deliver the image in time (connect {policy.connect_timeout_s:g} s, "
                 f"each read {policy.read_timeout_s:g} s, all {policy.total_timeout_s:g} s)", "image_fetch_timeout")


async def fetch_image(url: str, where: str, policy: FetchPolicy) -> bytes:
    """The bytes at an http(s) `url`, or an APIError naming `where` that says why not."""
    import httpx2

    try:
        parsed = httpx2.URL(url)
    except httpx2.InvalidURL as err:
        raise _fail(where, f"not a valid URL ({err})", "invalid_image_url") from None
    if not parsed.host:
        raise _fail(where, "the image URL names no host", "invalid_image_url")
    timeout = httpx2.Timeout(policy.read_timeout_s, connect=policy.connect_timeout_s)
    # trust_env=False: no proxy from the environment (it would be the address checked, not the image host's).
    async with httpx2.AsyncClient(timeout=timeout, trust_env=False, follow_redirects=False) as client:
        try:
            return await asyncio.wait_for(_download(client, parsed, where, policy),
                                          timeout=policy.total_timeout_s)
        except (httpx2.TimeoutException, asyncio.TimeoutError):
            raise _timeout(where, policy) from None
        except (httpx2.HTTPError, httpx2.InvalidURL) as err:  # InvalidURL: a redirect's bad Location
            raise _fail(where, f"could not fetch the image ({type(err).__name__}: {err})",
                        "image_fetch_failed") from None


async def fetch_remote_images(messages: list[dict[str, Any]], policy: FetchPolicy) -> list[dict[str, Any]]:
    """`messages` (as `ChatCompletionRequest.chat_messages` gives them) with every http(s)
    `image_url` part replaced by an `image` part holding the fetched bytes, at the same
    index, so a later error (not an image) names the part the client sent."""
    jobs: dict[tuple[int, int], asyncio.Task[bytes]] = {}
    for i, message in enumerate(messages):
        for j, part in enumerate(message["content"] if isinstance(message["content"], list) else ()):
            url = part.get("image_url", {}).get("url", "") if part.get("type") == "image_url" else ""
            if url.startswith(("http://", "https://")):
                jobs[i, j] = asyncio.ensure_future(fetch_image(url, f"messages[{i}].content[{j}]", policy))
    try:
        await asyncio.gather(*jobs.values())
    finally:  # the first failure answers the request; the other downloads stop
        for job in jobs.values():
            job.cancel()
    fetched = [dict(m) for m in messages]
    for (i, j), job in jobs.items():
        fetched[i]["content"] = list(fetched[i]["content"])
        fetched[i]["content"][j] = {"type": "image", "image": job.result()}
    return fetched
