"""Fetch a remote image safely: SSRF guard, size / time / pixel caps, content checks.

Page HTML is untrusted: an ``<img src>`` may point at ``file://``, at the cloud metadata service,
at a router on the LAN, or redirect there; it may be 2 GB, never end, or be a decompression bomb.

Design choices:
- http and https only. The host is resolved once with ``getaddrinfo``; EVERY resolved address must
  be public (``ipaddress.is_global``, not multicast; IPv4-mapped / 6to4 / Teredo IPv6 forms are
  unwrapped first), else the fetch is refused. The socket then connects to the address that was
  checked (``http.client`` with its connect pinned), so a second DNS answer (rebinding) is never
  used. TLS still verifies the certificate against the host name (SNI = host name).
- Redirects are followed by hand (at most ``max_redirects``) and each hop goes through the same
  scheme, resolution and address checks.
- ``allow_private=True`` lifts the address check for loopback/LAN; ``allow_networks`` lifts it for
  named CIDRs only (a local mirror, the tests' 127.0.0.0/8). The cloud metadata addresses stay
  refused even then.
- Caps: the body is streamed and cut at ``max_bytes``; one wall-clock deadline covers all hops.
  Socket timeouts alone are per ``recv``: a server sending one byte per second held a "15 s" fetch
  for 40-61 s (issue 15). So a timer shuts the socket down when the deadline passes, whatever
  phase the fetch is in (connect, TLS, headers, body), and the fetch fails as ``timeout``. The
  Content-Type must be a raster image type we store (SVG is refused: it can carry script); the
  bytes must sniff as PNG/JPEG/WebP/GIF too (a header can lie); the pixel count is read from the
  image header and checked BEFORE any decode. The bytes are decoded once, here
  (``duetgen.data.images.decode_image_bytes``), and come back as ``VerifiedImageBytes``, which the
  dataset writer stores without decoding them again.
- Failures raise ``FetchError(reason, detail)``; the stage turns them into image drops.
- A page saved to disk (``--input DIR``) names its images as files beside it; ``read_local`` reads
  them under the same caps, only from inside the input folder (``..``, absolute paths and symlinks
  that leave it are ``outside_input``), never a FIFO or a device.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import ssl
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from duetgen.data.engine.images import QR_MAX_SIDE

METADATA_ADDRESSES = {
    ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack
    ipaddress.ip_address("169.254.170.2"),  # AWS ECS task metadata
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    ipaddress.ip_address("fd00:ec2::254"),  # AWS IPv6
}
ALLOWED_CONTENT_TYPES = {"image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/x-png", "image/webp", "image/gif"}


@dataclass
class FetchConfig:
    allow_private: bool = False  # True: any loopback / private address may be fetched
    allow_networks: tuple[str, ...] = ()  # CIDRs allowed although not public, e.g. ("127.0.0.0/8",) for a local mirror
    timeout_s: float = 15.0  # one deadline for the whole fetch, all redirects included
    max_bytes: int = 15_000_000  # body cap, enforced while streaming
    max_pixels: int = 40_000_000  # header width*height cap, checked before decoding
    # A JPEG at least twice this on its longer side is decoded at a DCT scale (1/2, 1/4, 1/8) that keeps
    # the longer side >= this: no image check reads more (the QR check scales to images.QR_MAX_SIDE).
    # A 3000x2000 photo: decode, grey, rules and pHash 60.8 -> 37.2 CPU ms, the same QR codes read (issue 18).
    decode_side: int | None = QR_MAX_SIDE
    max_redirects: int = 5
    user_agent: str = "duetgen-data-engine/0.1 (+interleaved instruction data)"


class FetchError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def check_address(ip_str: str, allow_private: bool, allow_networks: tuple[str, ...] = ()) -> None:
    """Raise FetchError('blocked_address') unless ``ip_str`` may be contacted."""
    ip = ipaddress.ip_address(ip_str.split("%", 1)[0])  # drop an IPv6 zone id
    if ip.version == 6:  # unwrap IPv4 embedded in IPv6 forms
        inner = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is not None:
            ip = inner
    if ip in METADATA_ADDRESSES:
        raise FetchError("blocked_address", f"{ip} is a cloud metadata address")
    if ip.is_multicast or ip.is_unspecified:
        raise FetchError("blocked_address", f"{ip} is a multicast/unspecified address")
    if allow_private or any(ip in ipaddress.ip_network(n, strict=False) for n in allow_networks):
        return
    if not ip.is_global or ip.is_reserved:
        kind = next((k for k in ("loopback", "link_local", "private", "reserved") if getattr(ip, f"is_{k}")), "non-global")
        raise FetchError("blocked_address", f"{ip} is a {kind} address")


def resolve_checked(host: str, port: int, allow_private: bool, allow_networks: tuple[str, ...] = ()) -> str:
    """Resolve ``host`` and check every address it resolves to; return the one to connect to."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise FetchError("dns_error", f"cannot resolve {host!r}: {e}") from None
    addrs = sorted({info[4][0] for info in infos}, key=lambda a: (":" in a, a))  # IPv4 first
    if not addrs:
        raise FetchError("dns_error", f"{host!r} resolves to no address")
    for a in addrs:  # all of them: a mixed answer is how DNS rebinding slips a private one in
        check_address(a, allow_private, allow_networks)
    return addrs[0]


class _Deadline:
    """Shuts the hop's socket down when the wall-clock deadline passes (a blocked read then returns).

    It holds a ``dup`` of the socket taken at connect time: that descriptor names the same TCP
    socket through the TLS wrap (which detaches the original object) and cannot be reused for
    another connection before ``close``.
    """

    def __init__(self, remaining_s: float):
        self.fired = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._timer = threading.Timer(remaining_s, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock.dup())
            if self.fired.is_set():
                self._shutdown()

    def _fire(self) -> None:
        with self._lock:
            self.fired.set()
            self._shutdown()

    def _shutdown(self) -> None:
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:  # not connected yet, or already gone
                pass

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            for s in self._socks:
                s.close()
            self._socks.clear()


def _connection(scheme: str, host: str, port: int, ip: str, timeout: float,
                deadline: _Deadline) -> http.client.HTTPConnection:
    def pinned_connect(address, timeout=timeout, source_address=None):
        # A raw socket to the literal address: no getaddrinfo at all on this path.
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((ip, address[1]))
            deadline.watch(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    if scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn._create_connection = pinned_connect  # connect to the checked address, never a re-resolution
    return conn


@dataclass
class UndecodedImage:
    """Fetched image bytes whose header passed the checks (an allowed format, under the pixel cap), not decoded
    yet: the engine decodes an image only when no header rule (size, shape, named kinds) drops it anyway.
    Never stored: only ``ImageFetcher.load`` (a full decode) makes the ``VerifiedImageBytes`` a dataset keeps."""

    data: bytes
    format: str
    size: tuple[int, int]


class ImageFetcher:
    def __init__(self, cfg: FetchConfig):
        self.cfg = cfg

    def fetch(self, url: str, decode: bool = True) -> tuple:
        """(encoded bytes, decoded RGB PIL image) of the image at ``url``; with ``decode=False``
        (``UndecodedImage``, None). Raises FetchError."""
        deadline = time.monotonic() + self.cfg.timeout_s
        for _ in range(self.cfg.max_redirects + 1):
            status, headers, body_or_location = self._get_once(url, deadline)
            if status in (301, 302, 303, 307, 308):
                if not body_or_location:
                    raise FetchError("http_error", f"HTTP {status} redirect without Location from {url}")
                url = urljoin(url, body_or_location)
                continue
            return self._decode(body_or_location, headers, url, decode)
        raise FetchError("too_many_redirects", f"more than {self.cfg.max_redirects} redirects")

    def _get_once(self, url: str, deadline: float):
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise FetchError("bad_url", f"{url[:200]!r}: {e}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchError("unsupported_scheme", f"{scheme or 'no'} scheme in {url[:120]!r} (only http/https)")
        host = parts.hostname
        if not host:
            raise FetchError("bad_url", f"no host in {url[:200]!r}")
        port = port or (443 if scheme == "https" else 80)
        ip = resolve_checked(host, port, self.cfg.allow_private, tuple(self.cfg.allow_networks))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError("timeout", f"deadline of {self.cfg.timeout_s}s passed")
        watchdog = _Deadline(remaining)
        conn = _connection(scheme, host, port, ip, timeout=remaining, deadline=watchdog)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("GET", path, headers={"User-Agent": self.cfg.user_agent, "Accept": "image/*",
                                               "Accept-Encoding": "identity"})
            resp = conn.getresponse()
            if watchdog.fired.is_set():  # headers cut short by the shutdown: judge nothing from them
                raise FetchError("timeout", f"{url[:200]}: not received within {self.cfg.timeout_s}s")
            if resp.status in (301, 302, 303, 307, 308):
                return resp.status, resp.headers, resp.headers.get("Location")
            if resp.status != 200:
                raise FetchError("http_error", f"HTTP {resp.status} for {url[:200]}")
            ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype not in ALLOWED_CONTENT_TYPES:
                raise FetchError("bad_content_type", f"Content-Type {ctype or 'missing'!r} is not a raster image")
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.cfg.max_bytes:
                raise FetchError("too_large", f"Content-Length {int(declared):,} > cap {self.cfg.max_bytes:,}")
            chunks, total = [], 0
            while True:
                chunk = resp.read1(65536)  # what one recv brings: a slow body cannot hide in a 64 KiB read
                if watchdog.fired.is_set():  # the socket was shut down under the read
                    raise FetchError("timeout", f"{url[:200]}: not received within {self.cfg.timeout_s}s")
                if not chunk:
                    break
                total += len(chunk)
                if total > self.cfg.max_bytes:
                    raise FetchError("too_large", f"body exceeds cap {self.cfg.max_bytes:,} bytes")
                chunks.append(chunk)
            return 200, resp.headers, b"".join(chunks)
        except FetchError:
            raise
        except Exception as e:
            if watchdog.fired.is_set():  # whatever the read raised once its socket was shut down
                raise FetchError("timeout", f"{url[:200]}: not received within {self.cfg.timeout_s}s") from None
            if isinstance(e, (socket.timeout, TimeoutError)):
                raise FetchError("timeout", f"{url[:200]}: {e}") from None
            if isinstance(e, ssl.SSLError):
                raise FetchError("tls_error", f"{url[:200]}: {e}") from None
            if isinstance(e, (OSError, http.client.HTTPException)):
                raise FetchError("connect_error", f"{url[:200]}: {type(e).__name__}: {e}") from None
            raise
        finally:
            watchdog.close()
            conn.close()

    def read_local(self, root: str, page: str, src: str, decode: bool = True) -> tuple:
        """(path relative to ``root``, bytes, RGB image) of a saved page's image file (``decode=False``: as in
        ``fetch``). Raises FetchError.

        ``src`` is resolved against the page's folder (``page`` is relative to ``root``). The file
        must resolve, symlinks followed, inside ``root``; it is read under the same byte, format and
        pixel caps as a download.
        """
        parts = urlsplit(src)
        rel = unquote(parts.path)  # a saved page writes "step%201.jpg" for "step 1.jpg"
        if not rel or "\x00" in rel:
            raise FetchError("bad_url", f"{src[:200]!r} names no file")
        if rel.startswith("/"):
            raise FetchError("outside_input", f"{src[:200]!r} is an absolute path (only paths relative to the page are read)")
        root_path = Path(root).resolve()
        target = (root_path / Path(page).parent / rel).resolve()
        if not target.is_relative_to(root_path):
            raise FetchError("outside_input", f"{src[:200]!r} from {page!r} resolves outside the input folder")
        where = target.relative_to(root_path).as_posix()
        try:  # O_NONBLOCK: a FIFO put where the image should be cannot stall the worker
            fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise FetchError("missing_file", f"{src[:200]!r} from {page!r}: no file {where!r} in the input folder") from None
        except OSError as e:
            raise FetchError("unreadable_file", f"{where!r}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise FetchError("unreadable_file", f"{where!r} is not a regular file")
            if st.st_size > self.cfg.max_bytes:
                raise FetchError("too_large", f"{where!r}: {st.st_size:,} bytes > cap {self.cfg.max_bytes:,}")
            data = f.read(self.cfg.max_bytes + 1)
        if len(data) > self.cfg.max_bytes:  # grew after the stat
            raise FetchError("too_large", f"{where!r}: over the cap of {self.cfg.max_bytes:,} bytes")
        return (where, *self._decode(data, None, where, decode))

    def load(self, image: UndecodedImage, url: str) -> tuple:
        """(VerifiedImageBytes, RGB image) of bytes fetched with ``decode=False``. Raises FetchError."""
        return self._decode(image.data, None, url)

    def _decode(self, data: bytes, headers, url: str, decode: bool = True):
        """(VerifiedImageBytes, RGB image): the one check-then-decode path (``decode_image_bytes``), so
        the dataset writer stores these bytes without decoding them again. A large JPEG's image is
        decoded at a DCT scale (``decode_side``); the bytes' ``size`` is the file's. ``decode=False``: the
        header checks only, (``UndecodedImage``, None)."""
        import io

        from duetgen.data.images import ImageError, decode_image_bytes, inspect_image

        try:
            if not decode:
                im = inspect_image(io.BytesIO(data), url[:200], self.cfg.max_pixels, decode=False)
                return UndecodedImage(data, im.format, im.size), None
            return decode_image_bytes(data, url[:200], self.cfg.max_pixels, self.cfg.decode_side)
        except ImageError as e:  # unsupported_format | too_many_pixels | corrupt_image
            raise FetchError(e.reason, str(e)) from None
        except Exception as e:  # PIL raises many kinds on junk (struct.error, IndexError, ...)
            raise FetchError("corrupt_image", f"not a readable image ({type(e).__name__}: {e})") from None
