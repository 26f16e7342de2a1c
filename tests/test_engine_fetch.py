"""Data engine: the image fetcher's SSRF guard and caps, against a real local HTTP server."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "engine"))
from howto_site import Site, photo  # noqa: E402

from duetgen.data.engine import fetch as fetch_mod  # noqa: E402
from duetgen.data.engine.fetch import FetchConfig, FetchError, ImageFetcher, check_address  # noqa: E402

LOOPBACK = ("127.0.0.0/8",)


@pytest.fixture(scope="module")
def site():
    with Site(slow_s=2.0) as s:
        yield s


def reason(fetcher, url):
    with pytest.raises(FetchError) as e:
        fetcher.fetch(url)
    return e.value.reason


def test_good_image_and_redirect(site):
    f = ImageFetcher(FetchConfig(allow_networks=LOOPBACK))
    data, im = f.fetch(f"{site.url}/img/step1.jpg")
    assert data == photo(1) and im.size == (480, 360) and im.mode == "RGB"
    data, im = f.fetch(f"{site.url}/img/redirect-ok.jpg")
    assert data == photo(4)


@pytest.mark.parametrize("ip", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.1.1", "100.64.0.1",
                                "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "fe80::1", "fc00::1",
                                "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::1", "ff02::1"])
def test_non_public_addresses_are_refused(ip):
    with pytest.raises(FetchError) as e:
        check_address(ip, allow_private=False)
    assert e.value.reason == "blocked_address"


def test_public_addresses_pass_and_metadata_is_refused_even_when_private_is_allowed():
    check_address("93.184.216.34", allow_private=False)
    check_address("2606:2800:220:1:248:1893:25c8:1946", allow_private=False)
    check_address("10.0.0.1", allow_private=True)
    check_address("127.0.0.1", allow_private=False, allow_networks=LOOPBACK)
    for ip in ("169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254", "100.100.100.200"):
        with pytest.raises(FetchError, match="metadata"):
            check_address(ip, allow_private=True)


def test_loopback_refused_by_default_before_any_request(site):
    before = site.hits.get("/img/step1.jpg", 0)
    f = ImageFetcher(FetchConfig())
    assert reason(f, f"{site.url}/img/step1.jpg") == "blocked_address"
    port = site.url.rsplit(":", 1)[1]
    assert reason(f, f"http://localhost:{port}/img/step1.jpg") == "blocked_address"  # after DNS resolution
    assert reason(f, f"http://[::1]:{port}/img/step1.jpg") == "blocked_address"
    assert reason(f, f"http://2130706433:{port}/img/step1.jpg") in ("blocked_address", "dns_error")  # 127.0.0.1 as an integer
    assert site.hits.get("/img/step1.jpg", 0) == before  # nothing reached the server


def test_every_redirect_hop_is_checked(site):
    f = ImageFetcher(FetchConfig(allow_networks=LOOPBACK, timeout_s=5))
    t0 = time.perf_counter()
    assert reason(f, f"{site.url}/img/redirect-private.jpg") == "blocked_address"  # 10.255.255.1: never connected
    assert reason(f, f"{site.url}/img/redirect-metadata.jpg") == "blocked_address"
    assert time.perf_counter() - t0 < 2  # refused, not timed out trying to connect
    assert reason(f, f"{site.url}/img/redirect-loop.jpg") == "too_many_redirects"


def test_schemes_content_and_caps(site):
    f = ImageFetcher(FetchConfig(allow_networks=LOOPBACK, timeout_s=1.0, max_bytes=2_000_000))
    assert reason(f, "file:///etc/passwd") == "unsupported_scheme"
    assert reason(f, "data:image/png;base64,iVBORw0KGgo=") == "unsupported_scheme"
    assert reason(f, "ftp://example.com/a.png") == "unsupported_scheme"
    assert reason(f, f"{site.url}/img/evil.svg") == "bad_content_type"
    assert reason(f, f"{site.url}/img/fake.png") == "corrupt_image"  # served as image/png, bytes are HTML
    assert reason(f, f"{site.url}/img/corrupt.jpg") == "corrupt_image"  # truncated JPEG
    assert reason(f, f"{site.url}/img/bomb.png") == "too_many_pixels"  # 100 MP from ~100 KB, refused on the header
    assert reason(f, f"{site.url}/img/huge.jpg") == "too_large"  # streamed, no Content-Length
    assert reason(f, f"{site.url}/img/nothing-here.jpg") == "http_error"
    t0 = time.perf_counter()
    assert reason(f, f"{site.url}/img/slow.jpg") == "timeout"
    assert time.perf_counter() - t0 < 1.8
    assert reason(f, "http://no-such-host.invalid/a.jpg") == "dns_error"
    assert reason(f, "http://[not-an-ip/a.jpg") == "bad_url"


@pytest.mark.parametrize("path", ["/img/drip.jpg", "/img/drip-headers.jpg"])
def test_deadline_is_wall_clock_against_a_server_that_drips_bytes(site, path):
    """Issue 15 item 2: one byte every 50 ms kept every socket read alive; the deadline is a wall clock now."""
    f = ImageFetcher(FetchConfig(allow_networks=LOOPBACK, timeout_s=1.0))
    t0 = time.perf_counter()
    with pytest.raises(FetchError) as e:
        f.fetch(f"{site.url}{path}")
    elapsed = time.perf_counter() - t0
    assert e.value.reason == "timeout" and "within 1.0s" in e.value.detail and path in e.value.detail
    assert 0.9 < elapsed < 1.5, elapsed  # the server would have dripped for 4 s


def test_connects_to_the_checked_address_not_a_re_resolution(site, monkeypatch):
    """A host name resolves once; the socket goes to that address; Host header keeps the name."""
    calls = []
    port = int(site.url.rsplit(":", 1)[1])

    def fake_getaddrinfo(host, p, *a, **kw):
        calls.append(host)
        # first answer: loopback (allowed in this test); any later answer would be a "rebinding" to a dead address
        ip = "127.0.0.1" if len(calls) == 1 else "10.255.255.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, p))]

    monkeypatch.setattr(fetch_mod.socket, "getaddrinfo", fake_getaddrinfo)
    f = ImageFetcher(FetchConfig(allow_networks=LOOPBACK, timeout_s=3))
    data, _ = f.fetch(f"http://images.test:{port}/img/step2.jpg")
    assert data == photo(2) and calls == ["images.test"]
    assert site.hosts[-1] == f"images.test:{port}"


def test_mixed_dns_answer_with_one_private_address_is_refused(monkeypatch):
    def fake_getaddrinfo(host, p, *a, **kw):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", p)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.168.0.10", p))]

    monkeypatch.setattr(fetch_mod.socket, "getaddrinfo", fake_getaddrinfo)
    assert reason(ImageFetcher(FetchConfig()), "http://rebind.test/a.jpg") == "blocked_address"
