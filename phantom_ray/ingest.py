"""The one way bytes from outside become an image: ``fetch_bytes`` (where from) and ``open_image``
(bytes -> RGB PIL image), with one set of limits (:class:`ImageLimits`).

Every entry point that takes images from users goes through here: ``data pack``, captioning, the
HTTP API and eval. So an image is accepted or refused the same way everywhere, with the same
reason code (:data:`IMAGE_REASONS`), and tiling (``phantom_ray.processing.images``) only ever sees
a decoded RGB image that is within the limits.

Decisions made once, here:

* Aspect ratio: at most 200:1. PhantomProcessor tiles into at most ``max_tiles`` (6) tiles of
  448 px, so a 2000:1 image would be squeezed to a fraction of a pixel on its short side (the model
  sees noise). Qwen2-VL's ``smart_resize`` refuses beyond 200:1 for the same reason. A 2000:1 image
  is therefore refused by pack, caption, serve and eval alike.
* Pixels: at most 8192 x 8192 (64 Mi). Checked from the file header before any pixel is decoded, so
  a decompression bomb (a small file that declares a huge canvas) costs nothing. PIL's own
  process-wide guard is also caught (``DecompressionBombError``/``Warning``).
* Bytes: at most 20 MiB encoded (OpenAI's limit for one image), checked before decoding and, for
  fetches, while streaming.
* Formats: JPEG (and MPO, the multi-picture JPEG phones write, opened by the JPEG plugin), PNG, GIF, WebP, BMP, TIFF. PIL's
  other plugins are never tried: EPS would run Ghostscript, and SVG/PDF/text are not images.

``fetch_bytes`` reads a local path, ``s3://`` URI, ``data:`` URI or http(s) URL under a
:class:`FetchPolicy`. URLs are normalised before they are checked (scheme/host case, IDNA, trailing
dots, default ports, percent-encoding, dot segments; userinfo and encoded slashes are refused), the
allowlist matches scheme + host + port + a path prefix on segment boundaries, every resolved address
is checked (link-local/metadata always refused; loopback/private unless the policy allows them) and
the connection goes to the address that was checked (no second DNS lookup to rebind). Redirects are
followed by hand, each hop checked like the first. Paths and S3 keys resolve inside ``policy.root``
when one is set.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import struct
import time
import warnings
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urljoin, urlsplit

from phantom_ray.errors import clean_detail

# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


class InputError(ValueError):
    """Input that cannot be used. ``reason`` is a short code fit for an error table's reason column;
    ``message`` (also ``detail``) says what is wrong and, where it helps, what to do."""

    def __init__(self, reason: str, message: str):
        message = clean_detail(str(message))
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    @property
    def detail(self) -> str:
        return self.message

    def __reduce__(self):  # keep (reason, message) across pickling (Ray ships exceptions)
        return (type(self), (self.reason, self.message))


class ImageError(InputError):
    """Bytes that are not an acceptable image (corrupt, empty, too large, absurd shape, wrong format)."""


class FetchError(InputError):
    """A source that may not or cannot be read (refused URL/path, not found, too large, timed out)."""


# the reason codes raised here; what each means, its HTTP status and its error-row reason are in
# the one table, phantom_ray.errors.REASONS
IMAGE_REASONS = ("empty_image", "image_too_large", "too_many_pixels", "bad_aspect_ratio", "unsupported_format",
                 "undecodable_image")
FETCH_REASONS = ("source_not_allowed", "address_not_allowed", "bad_source", "invalid_base64", "not_found",
                 "fetch_failed", "source_too_large")

# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 8192 * 8192
DEFAULT_MAX_ASPECT_RATIO = 200.0
# (PIL opens MPO, the multi-picture JPEG that phones write, through its JPEG plugin)
DEFAULT_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
# Transparent pixels are composited over white (documents and logos are drawn for a white page).
ALPHA_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class ImageLimits:
    """What an acceptable image is. One default set for every entry point (see module doc)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO
    formats: tuple[str, ...] = DEFAULT_FORMATS

    def check_size(self, size: tuple[int, int], what: str = "image") -> None:
        w, h = size
        if w <= 0 or h <= 0:
            raise ImageError("empty_image", f"{what} has zero size ({w}x{h})")
        if self.max_pixels and w * h > self.max_pixels:
            raise ImageError("too_many_pixels", f"{what} is {w}x{h} = {w * h} pixels, over the limit of "
                                                f"{self.max_pixels} (raise max_pixels if intended)")
        ratio = max(w / h, h / w)
        if self.max_aspect_ratio and ratio > self.max_aspect_ratio:
            raise ImageError("bad_aspect_ratio", f"{what} is {w}x{h}, aspect ratio {ratio:.1f}:1 is over the "
                                                 f"limit of {self.max_aspect_ratio:g}:1")


DEFAULT_LIMITS = ImageLimits()


def _sniff(data: bytes) -> str:
    """A short description of bytes PIL does not recognise (for the error message)."""
    head = data[:512].lstrip().lower()
    if head.startswith(b"<?xml") or b"<svg" in head:
        return "SVG/XML text"
    if head.startswith(b"%pdf"):
        return "a PDF document"
    if head.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    try:
        data[:512].decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return f"binary data starting {data[:8]!r}"


def open_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS, what: str = "image",
               exif_transpose: bool = True) -> "Image.Image":
    """Encoded bytes -> a fully decoded RGB PIL image, or :class:`ImageError`.

    The first frame of animations, EXIF orientation applied, alpha composited over white, 16-bit
    and float scaled to 8 bits, CMYK/YCbCr/palette converted. Byte, pixel (from the header, before
    decoding) and aspect-ratio limits and the format allowlist come from ``limits``."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise ImageError("undecodable_image", f"{what}: expected encoded bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError("empty_image", f"{what} is empty (0 bytes)")
    if limits.max_bytes and len(data) > limits.max_bytes:
        raise ImageError("image_too_large", f"{what} is {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            # PIL warns (and past 2x its limit raises) for huge canvases; our own pixel check below
            # decides, but the error form is caught too so no PIL limit escapes as a crash.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(limits.formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too_many_pixels", f"{what}: {exc}") from None
    except UnidentifiedImageError:
        fmt = _identify_any(data)
        if fmt:
            raise ImageError("unsupported_format", f"{what} is {fmt}, not one of the accepted formats "
                                                   f"({', '.join(limits.formats)})") from None
        raise ImageError("undecodable_image", f"{what} ({len(data)} bytes) is not a readable image: it looks like {_sniff(data)}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # e.g. a header PIL cannot parse
        raise ImageError("undecodable_image", f"{what} ({len(data)} bytes) is not a readable image: {exc}") from None
    limits.check_size(img.size, what)  # from the header, before any pixel is decoded
    try:
        img.seek(0)  # first frame of animations (GIF, APNG, WebP)
        img.load()
        if exif_transpose:
            img = ImageOps.exif_transpose(img) or img
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        fmt = img.format or "image"
        raise ImageError("undecodable_image", f"{what}: {fmt} data is corrupt or truncated: {exc}") from None
    except Image.DecompressionBombError as exc:  # a frame larger than the canvas
        raise ImageError("too_many_pixels", f"{what}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - PIL's decoders raise assorted types (IndexError,
        # ZeroDivisionError, ...) on crafted files; one hostile image must be a refusal, not a crash
        raise ImageError("undecodable_image", f"{what}: {img.format or 'image'} data is invalid "
                                              f"({type(exc).__name__}: {exc})") from None
    limits.check_size(img.size, what)  # after decoding: a frame/transpose cannot exceed the limits either
    return to_rgb(img)


def _identify_any(data: bytes) -> str | None:
    """The format name if PIL recognises ``data`` at all (without opening it with every plugin's
    decoder: only the header is parsed; EPS/PDF parsing does not run Ghostscript)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                return im.format
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None
    except Exception:  # noqa: BLE001 - a third-party plugin's header parser failing is "not recognised"
        return None


def to_rgb(img: "Image.Image") -> "Image.Image":
    """Any PIL mode -> RGB: alpha over white, 16/32-bit and float scaled to 8 bits, CMYK/YCbCr/LAB
    converted by PIL, palette expanded (with its transparency)."""
    import numpy as np
    from PIL import Image

    if img.size[0] <= 0 or img.size[1] <= 0:
        raise ImageError("empty_image", f"image has zero size {img.size}")
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode == "L" and "transparency" in img.info:
        img = img.convert("LA")
        mode = "LA"
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(img))).convert("RGB")
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode == "RGB" or img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError("unsupported_format", f"cannot convert image mode {mode!r} to RGB: {exc}") from None


def _scale_to_uint8(a):
    import numpy as np

    a = a.astype(np.float64)
    hi = float(a.max()) if a.size else 0.0
    if hi <= 1.0 and a.dtype.kind == "f" and float(a.min()) >= 0.0:
        scale = 255.0  # float images in [0, 1]
    elif hi <= 255.0:
        scale = 1.0
    elif hi <= 65535.0:
        scale = 255.0 / 65535.0  # 16-bit
    else:
        scale = 255.0 / hi
    return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Fetching
# ------------------------------------------------------------------------------------------------

# Cloud metadata endpoints: refused whatever the policy says (they hand out credentials).
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata", "instance-data",
                            "instance-data.ec2.internal", "metadata.azure.internal"})
_METADATA_NETS = tuple(ipaddress.ip_network(n) for n in (
    "169.254.0.0/16",      # IPv4 link-local: AWS/GCP/Azure/OpenStack metadata at 169.254.169.254
    "fe80::/10",           # IPv6 link-local
    "fd00:ec2::254/128",   # AWS metadata over IPv6
    "100.100.100.200/32",  # Alibaba Cloud metadata
))
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


@dataclass(frozen=True)
class FetchPolicy:
    """Where ``fetch_bytes`` may read from.

    ``root``: a local directory or ``s3://bucket/prefix``; relative paths resolve against it and
    every local path / S3 key must resolve inside it (symlinks followed). ``None``: local paths and
    S3 URIs are read as given (trusted input such as a CLI argument).
    ``allowed_urls``: ``http(s)://host[:port]/path-prefix`` and ``s3://bucket/prefix`` entries;
    http(s) URLs must match one (nothing is fetched over HTTP when it is empty); S3 URIs must match
    one when any ``s3://`` entry is listed and no ``root`` is set.
    ``allow_private``: loopback/private/CGNAT/unique-local addresses may be fetched (link-local and
    metadata addresses never)."""

    root: str | None = None
    allow_local: bool = True
    allow_s3: bool = True
    allow_data: bool = True
    allowed_urls: tuple[str, ...] = ()
    allow_private: bool = False
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout_s: float = 10.0
    max_redirects: int = 3
    _parsed: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "allowed_urls", tuple(self.allowed_urls))
        object.__setattr__(self, "_parsed", tuple(parse_allow_entry(e) for e in self.allowed_urls))


def fetch_bytes(source: str | os.PathLike, policy: FetchPolicy = FetchPolicy()) -> bytes:
    """The bytes of ``source`` (local path, ``file://``, ``s3://``, ``data:`` or http(s) URL) under
    ``policy``, or :class:`FetchError` naming what was refused and why."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise FetchError("bad_source", f"expected a path or URL, got {source!r}")
    if any(c in source for c in "\x00\r\n"):
        raise FetchError("bad_source", f"{source[:80]!r} contains control characters")
    scheme = source.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", source) else ""
    if scheme == "data":
        if not policy.allow_data:
            raise FetchError("source_not_allowed", "data: URIs are not accepted here")
        return _data_uri(source, policy.max_bytes)
    if scheme in ("http", "https"):
        return _fetch_http(source, policy)
    if scheme == "s3":
        if not policy.allow_s3:
            raise FetchError("source_not_allowed", f"s3:// URIs are not accepted here ({source})")
        return _read_checked(resolve_s3(source, policy), policy)
    if scheme == "file":
        parts = urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise FetchError("bad_source", f"file URL with a host is not supported: {source}")
        source = unquote(parts.path)
    elif scheme and len(scheme) > 1:  # "C:" style drive letters are paths, everything else a scheme
        raise FetchError("source_not_allowed", f"unsupported scheme {scheme!r} in {source[:80]!r}")
    if (policy.root or "").startswith("s3://") and scheme != "file":
        if not policy.allow_s3:
            raise FetchError("source_not_allowed", f"s3:// keys are not accepted here ({source})")
        return _read_checked(resolve_s3(source, policy), policy)  # a key relative to the S3 root
    if not policy.allow_local:
        raise FetchError("source_not_allowed", "local paths are not accepted here")
    return _read_checked(resolve_local(source, policy.root), policy)


def resolve_source(source: str, policy: FetchPolicy) -> str:
    """The canonical location ``fetch_bytes`` would read for a path or ``s3://`` URI (for size
    estimates, listings): raises FetchError where fetch_bytes would refuse."""
    if str(source).startswith("s3://") or (policy.root or "").startswith("s3://"):
        return resolve_s3(str(source), policy)
    return resolve_local(str(source), policy.root)


def _read_checked(uri: str, policy: FetchPolicy) -> bytes:
    from phantom_ray import storage

    try:
        n = storage.size(uri)
        if policy.max_bytes and n > policy.max_bytes:
            raise FetchError("source_too_large", f"{uri} is {n} bytes, over the limit of {policy.max_bytes}")
        return storage.read_bytes(uri)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise FetchError("not_found", f"{uri} does not exist") from None
    except PermissionError as exc:
        raise FetchError("fetch_failed", f"cannot read {uri}: permission denied") from exc
    except OSError as exc:
        raise FetchError("fetch_failed", f"cannot read {uri}: {exc}") from None


# ---- local paths and S3 keys -------------------------------------------------------------------

def resolve_local(path: str, root: str | None) -> str:
    """``path`` (relative to ``root`` when relative) with symlinks resolved; with a root, refused
    unless it lies inside the root's own resolved path."""
    if root is None:
        return os.path.realpath(os.path.expanduser(path))
    if str(root).startswith("s3://"):
        raise FetchError("source_not_allowed", f"local path {path!r} is outside the image root {root}")
    real_root = os.path.realpath(root)
    candidate = path if os.path.isabs(path) else os.path.join(real_root, path)
    real = os.path.realpath(candidate)
    if real != real_root and os.path.commonpath([real, real_root]) != real_root:
        raise FetchError("source_not_allowed", f"{path!r} resolves to {real}, outside the image root {root} "
                                               f"(absolute paths, '..' and symlinks must stay inside it)")
    return real


def _s3_parts(uri: str) -> tuple[str, list[str]]:
    """(bucket, key segments) through the one split (:func:`phantom_ray.storage.s3_key_segments`:
    dot segments refused), with the bucket name checked."""
    from phantom_ray import storage

    rest = uri[len("s3://"):] if uri.lower().startswith("s3://") else uri
    bucket = rest.partition("/")[0]
    if not bucket or not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
        raise FetchError("bad_source", f"{uri!r} has no valid bucket name")
    try:
        bucket, segs = storage.s3_key_segments("s3://" + rest)
    except ValueError:
        raise FetchError("source_not_allowed", f"{uri!r} has '.' or '..' segments; S3 keys must be plain") from None
    while segs and segs[-1] == "":
        segs.pop()
    return bucket, segs


def resolve_s3(source: str, policy: FetchPolicy) -> str:
    """The ``s3://`` URI for ``source``: an S3 URI, or a key relative to an ``s3://`` root. Dot
    segments are refused (S3 keeps them literally, so ``a/../b`` is not ``b`` there; allowing them
    would make confinement depend on who interprets the key), and the result must lie under
    ``policy.root`` (bucket equal, key prefix on ``/`` boundaries) or match an ``s3://`` allowlist entry."""
    root = policy.root
    if not source.lower().startswith("s3://"):
        if root is None or not root.startswith("s3://"):
            raise FetchError("source_not_allowed", f"{source!r} is not an s3:// URI")
        if source.startswith("/") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", source):
            raise FetchError("source_not_allowed", f"{source!r} is an absolute path, outside the image root {root}")
        source = root.rstrip("/") + "/" + source
    bucket, segs = _s3_parts(source)
    if not segs:
        raise FetchError("bad_source", f"{source!r} names a bucket, not an object")
    uri = f"s3://{bucket}/" + "/".join(segs)
    if root is not None:
        if not root.startswith("s3://"):
            raise FetchError("source_not_allowed", f"{uri} is outside the image root {root}")
        rb, rsegs = _s3_parts(root)
        if rb != bucket or segs[:len(rsegs)] != rsegs or len(segs) <= len(rsegs):
            raise FetchError("source_not_allowed", f"{uri} is outside the image root {root}")
        return uri
    s3_entries = [e for e in policy._parsed if e[0] == "s3"]
    if s3_entries and not any(bucket == e[1] and segs[:len(e[3])] == list(e[3]) for e in s3_entries):
        raise FetchError("source_not_allowed", f"{uri} does not match an allowed s3:// prefix")
    return uri


# ---- data: URIs --------------------------------------------------------------------------------

def _data_uri(uri: str, max_bytes: int) -> bytes:
    head, sep, payload = uri.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        raise FetchError("bad_source", f"data URI {head[:40]!r} must be data:<type>;base64,<data>")
    media = head[5:-7].split(";")[0].strip().lower()
    if media and not media.startswith("image/"):
        raise FetchError("bad_source", f"data URI media type {media!r} is not an image type")
    payload = payload.strip()
    if max_bytes and len(payload) * 3 // 4 > max_bytes + 3:  # before decoding: no allocation for huge payloads
        raise FetchError("source_too_large", f"data URI holds about {len(payload) * 3 // 4} bytes, over the "
                                             f"limit of {max_bytes}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FetchError("invalid_base64", f"data URI has invalid base64 ({exc})") from None
    return data


# ---- URLs --------------------------------------------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_RE = re.compile(r"^[a-z0-9]([a-z0-9\-_]*[a-z0-9])?(\.[a-z0-9]([a-z0-9\-_]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class NormURL:
    scheme: str
    host: str          # lower-case, IDNA (punycode), no trailing dot; IPv6 without brackets
    port: int
    segments: tuple[str, ...]  # decoded path segments, dot segments resolved
    query: str

    @property
    def target(self) -> str:
        """The request target: the normalised path, re-encoded, plus the query."""
        path = "/" + "/".join(quote(s, safe="!$&'()*+,;=:@~-._") for s in self.segments)
        return path + (f"?{self.query}" if self.query else "")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        netloc = host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"
        return f"{self.scheme}://{netloc}{self.target}"


def _norm_host(raw: str, url: str) -> str:
    host = unquote(raw).strip().lower()
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1].split("%")[0]))
        except ValueError:
            raise FetchError("bad_source", f"{url[:120]!r}: invalid IPv6 address") from None
    host = host.rstrip(".")
    if not host:
        raise FetchError("bad_source", f"{url[:120]!r} has no host")
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise FetchError("bad_source", f"{url[:120]!r}: host {raw!r} is not a valid domain name") from None
    if not _HOST_RE.match(host):
        raise FetchError("bad_source", f"{url[:120]!r}: host {raw!r} has characters not allowed in a host name")
    return host


def normalize_url(url: str) -> NormURL:
    """Parse and normalise an http(s) URL the way a server would interpret it (RFC 3986 section 6):
    case of scheme/host, IDNA, trailing dot, default port, percent-decoding, dot segments. Userinfo,
    backslashes, encoded slashes and ``..`` above the root are refused rather than guessed at."""
    if any(c in url for c in "\\\x00\t\r\n "):
        raise FetchError("bad_source", f"{url[:120]!r} contains backslashes, spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise FetchError("bad_source", f"{url[:120]!r} is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise FetchError("source_not_allowed", f"{url[:120]!r}: only http and https URLs are fetched")
    if "@" in parts.netloc:
        raise FetchError("source_not_allowed", f"{url[:120]!r}: URLs with user info (user@host) are refused")
    hostname = parts.hostname or ""
    host = _norm_host(f"[{hostname}]" if ":" in hostname else hostname, url)
    port = port if port is not None else _DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise FetchError("bad_source", f"{url[:120]!r}: port {port} out of range")
    segments: list[str] = []
    raw_segs = parts.path.split("/")[1:] if parts.path.startswith("/") else parts.path.split("/")
    for k, raw in enumerate(raw_segs):
        seg = unquote(raw)
        if "/" in seg or "\\" in seg:
            raise FetchError("source_not_allowed", f"{url[:120]!r}: encoded slashes in the path are refused")
        last = k == len(raw_segs) - 1
        if seg == ".":
            if last:
                segments.append("")
            continue
        if seg == "..":
            if not segments:
                raise FetchError("source_not_allowed", f"{url[:120]!r}: '..' climbs above the site root")
            segments.pop()
            if last:
                segments.append("")
            continue
        segments.append(seg)
    return NormURL(scheme, host, port, tuple(segments), parts.query)


def parse_allow_entry(entry: str) -> tuple:
    """An allowlist entry -> ('http'|'https', host, port, segments) or ('s3', bucket, None, segments)."""
    if entry.lower().startswith("s3://"):
        bucket, segs = _s3_parts(entry)
        return ("s3", bucket, None, tuple(s for s in segs if s))
    n = normalize_url(entry)
    if n.query:
        raise ValueError(f"allowlist entry {entry!r} must not have a query")
    return (n.scheme, n.host, n.port, tuple(s for s in n.segments if s))


def url_allowed(n: NormURL, policy: FetchPolicy) -> bool:
    """scheme, host and port equal, and the entry's path segments a prefix of the URL's."""
    for scheme, host, port, segs in policy._parsed:
        if scheme == n.scheme and host == n.host and port == n.port and n.segments[:len(segs)] == segs:
            if len(segs) == 0 or len(n.segments) >= len(segs):
                return True
    return False


def check_address(ip: str, policy: FetchPolicy, host: str) -> None:
    """Refuse link-local/metadata always, and loopback/private/reserved unless the policy allows."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address):
        mapped = addr.ipv4_mapped or addr.sixtofour
        if mapped is not None:
            addr = mapped
        elif addr in ipaddress.ip_network("64:ff9b::/96"):  # NAT64: the IPv4 address is the low 32 bits
            addr = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if any(addr in net for net in _METADATA_NETS if net.version == addr.version):
        raise FetchError("address_not_allowed", f"{host} resolves to {addr}, a link-local/metadata address")
    special = (addr.is_loopback or addr.is_private or addr.is_reserved or addr.is_multicast
               or addr.is_unspecified or (addr.version == 4 and addr in _CGNAT))
    if special and not policy.allow_private:
        raise FetchError("address_not_allowed", f"{host} resolves to {addr}, a loopback/private address "
                                                "(not fetched unless the configuration allows private hosts)")


def _resolve(n: NormURL, policy: FetchPolicy) -> str:
    if n.host in METADATA_HOSTS or n.host.endswith(".internal"):
        raise FetchError("address_not_allowed", f"{n.host} is a cloud metadata/internal host")
    try:
        infos = socket.getaddrinfo(n.host, n.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError("fetch_failed", f"cannot resolve {n.host}: {exc}") from None
    ips = list(dict.fromkeys(info[4][0] for info in infos))
    if not ips:
        raise FetchError("fetch_failed", f"{n.host} resolves to no address")
    for ip in ips:  # every address: a host with one good and one bad record is refused
        check_address(ip, policy, n.host)
    return ips[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the checked IP; the Host header still names the host."""

    def __init__(self, host, ip, **kw):
        super().__init__(host, **kw)
        self._ip = ip

    def connect(self):
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host, ip, **kw):
        super().__init__(host, **kw)
        self._ip = ip

    def connect(self):
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # certificate checked for the host


def _fetch_http(url: str, policy: FetchPolicy) -> bytes:
    deadline = time.monotonic() + policy.timeout_s
    current = url
    for hop in range(policy.max_redirects + 1):
        n = normalize_url(current)
        if not url_allowed(n, policy):
            what = "redirect target" if hop else "URL"
            raise FetchError("source_not_allowed", f"{what} {n.url[:160]} is not under an allowed prefix "
                                                   f"({', '.join(policy.allowed_urls) or 'none configured'})")
        ip = _resolve(n, policy)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError("fetch_failed", f"{url[:160]}: timed out after {policy.timeout_s:g} s")
        cls = _PinnedHTTPSConnection if n.scheme == "https" else _PinnedHTTPConnection
        kw = {"context": ssl.create_default_context()} if n.scheme == "https" else {}
        conn = cls(n.host, ip, port=n.port, timeout=remaining, **kw)
        try:
            conn.request("GET", n.target, headers={"User-Agent": "phantom-ray", "Accept": "image/*",
                                               "Accept-Encoding": "identity"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                loc = resp.getheader("Location")
                if not loc:
                    raise FetchError("fetch_failed", f"{n.url[:160]}: redirect without a Location")
                current = urljoin(n.url, loc)
                continue
            if resp.status != 200:
                raise FetchError("fetch_failed", f"{n.url[:160]}: HTTP {resp.status} {resp.reason}")
            declared = resp.getheader("Content-Length")
            if declared and declared.isdigit() and policy.max_bytes and int(declared) > policy.max_bytes:
                raise FetchError("source_too_large", f"{n.url[:160]} is {declared} bytes, over the limit "
                                                     f"of {policy.max_bytes}")
            chunks, total = [], 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FetchError("fetch_failed", f"{n.url[:160]}: timed out after {policy.timeout_s:g} s")
                if conn.sock is not None:
                    conn.sock.settimeout(left)
                chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if policy.max_bytes and total > policy.max_bytes:
                    raise FetchError("source_too_large", f"{n.url[:160]} sent more than {policy.max_bytes} bytes")
            return b"".join(chunks)
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, socket.timeout) or "timed out" in str(exc):
                raise FetchError("fetch_failed", f"{n.url[:160]}: timed out after {policy.timeout_s:g} s") from None
            raise FetchError("fetch_failed", f"cannot fetch {n.url[:160]}: {exc}") from None
        finally:
            conn.close()
    raise FetchError("fetch_failed", f"{url[:160]}: more than {policy.max_redirects} redirects")


def read_uri(uri: str) -> bytes:
    """The bytes of a canonical local path or ``s3://`` URI a job already decided to read (a planned
    caption row, an eval item): one GET, no policy; a failure is a :class:`FetchError`
    (``not_found`` or ``fetch_failed``). Limits apply when the bytes are opened (:func:`open_image`)."""
    from phantom_ray import storage

    try:
        return storage.read_bytes(uri)
    except FileNotFoundError as exc:
        raise FetchError("not_found", f"cannot read {uri}: {exc}") from None
    except OSError as exc:  # PermissionError, a directory, network
        raise FetchError("fetch_failed", f"cannot read {uri}: {exc}") from None


def load_image(source, policy: FetchPolicy | None = None, limits: ImageLimits = DEFAULT_LIMITS):
    """The one way from a source to an RGB image: encoded bytes are opened as they are; a path or
    URI is read (``policy`` None: :func:`read_uri`, a trusted location; else :func:`fetch_bytes` under
    ``policy``) and opened by :func:`open_image` with ``limits``. Raises FetchError / ImageError."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return open_image(bytes(source), limits)
    if policy is None:
        data = read_uri(str(source))
    else:
        data = fetch_bytes(source, policy)
    return open_image(data, limits, what=_short(source))


def _short(source) -> str:
    s = str(source)
    return s if len(s) <= 120 else s[:60] + "..." + s[-40:]
