"""URL safety of fetch_bytes against real HTTP servers on loopback: traversal, encoding, userinfo,
case, ports, redirects, private/metadata addresses, DNS rebinding, size and time bounds."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from phantom_ray import ingest
from phantom_ray.ingest import FetchError, FetchPolicy, fetch_bytes, normalize_url, url_allowed

IMG = b"\x89PNG-ok"
SECRET = b"SECRET"


def _server(routes_for):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            H.seen.append(self.path)
            status, headers, body = routes_for(self.path, self.server.server_port)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if isinstance(body, bytes):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if callable(body):
                body(self.wfile)
            elif body:
                self.wfile.write(body)

    H.seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, H.seen


@pytest.fixture(scope="module")
def other():
    srv, seen = _server(lambda path, port: (200, {}, SECRET))
    yield srv.server_port, seen
    srv.shutdown()


@pytest.fixture(scope="module")
def site(other):
    other_port = other[0]

    def slow(w):
        w.write(b"x")
        w.flush()
        time.sleep(3)

    def endless(w):
        for _ in range(1000):
            w.write(b"y" * 65536)

    def routes(path, port):
        return {
            "/ok/img.png": (200, {}, IMG),
            "/secret/x.png": (200, {}, SECRET),
            "/ok/redirect-in": (302, {"Location": "/ok/img.png"}, b""),
            "/ok/redirect-out-path": (302, {"Location": "/secret/x.png"}, b""),
            "/ok/redirect-other-host": (302, {"Location": f"http://localhost:{other_port}/ok/img.png"}, b""),
            "/ok/redirect-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
            "/ok/redirect-loop": (302, {"Location": "/ok/redirect-loop"}, b""),
            "/ok/big": (200, {}, b"z" * 5000),
            "/ok/endless": (200, {}, endless),
            "/ok/slow": (200, {}, slow),
            "/ok/missing": (404, {}, b"no"),
        }.get(path, (404, {}, b"no"))

    srv, seen = _server(routes)
    yield srv.server_port, seen
    srv.shutdown()


def policy(port, **kw):
    kw.setdefault("allow_private", True)  # the test servers are on loopback
    return FetchPolicy(allowed_urls=(f"http://127.0.0.1:{port}/ok/",), **kw)


def test_allowed_url_and_same_prefix_redirect_are_fetched(site):
    port, _ = site
    assert fetch_bytes(f"http://127.0.0.1:{port}/ok/img.png", policy(port)) == IMG
    assert fetch_bytes(f"http://127.0.0.1:{port}/ok/redirect-in", policy(port)) == IMG
    # respellings of the same allowed URL are the same URL
    for url in [f"HTTP://127.0.0.1:{port}/ok/./img.png", f"http://127.0.0.1:{port}/ok/sub/../img.png",
                f"http://127.0.0.1:{port}/ok/%69mg.png", f"http://127.0.0.1:{port}/x/../ok/img.png"]:
        assert fetch_bytes(url, policy(port)) == IMG, url


@pytest.mark.parametrize("path", [
    "/ok/../secret/x.png", "/ok/%2e%2e/secret/x.png", "/ok/%2E%2E/secret/x.png", "/ok/.%2e/secret/x.png",
    "/ok/%2e./secret/x.png", "/ok%2f..%2fsecret/x.png", "/ok/..%2fsecret/x.png", "/ok/..%5csecret/x.png",
    "/ok/..\\secret/x.png", "/okay/../secret/x.png", "/ok-not/img.png", "/OK/img.png", "/secret/x.png",
    "/ok/../../../secret/x.png", "/../ok/img.png",
])
def test_traversal_and_encoding_tricks_are_refused(site, path):
    port, seen = site
    before = len(seen)
    with pytest.raises(FetchError) as e:
        fetch_bytes(f"http://127.0.0.1:{port}{path}", policy(port))
    assert e.value.reason in ("source_not_allowed", "bad_source"), e.value
    assert SECRET not in str(e.value).encode()
    assert len(seen) == before  # refused before any request was sent


@pytest.mark.parametrize("template", [
    "http://127.0.0.1:{port}@localhost:{other}/ok/img.png",   # userinfo: the real host is after '@'
    "http://user:pw@127.0.0.1:{port}/ok/img.png",             # userinfo on the allowed host
    "http://127.0.0.1:{port}%40localhost:{other}/ok/img.png",  # encoded '@'
    "http://127.0.0.1:{other}/ok/img.png",                     # same host, another port
    "http://localhost:{port}/ok/img.png",                      # another host name for the same address
    "https://127.0.0.1:{port}/ok/img.png",                     # another scheme
    "ftp://127.0.0.1:{port}/ok/img.png",
    "http://127.0.0.1:{port}#@localhost:{other}/ok/img.png",
    "http://127.0.0.1.:{other}/ok/img.png",
])
def test_host_port_scheme_and_userinfo_tricks_are_refused(site, other, template):
    port, seen = site
    other_port, other_seen = other
    before, other_before = len(seen), len(other_seen)
    with pytest.raises(FetchError):
        fetch_bytes(template.format(port=port, other=other_port), policy(port))
    assert len(other_seen) == other_before


def test_redirects_are_checked_every_hop(site, other):
    port, _ = site
    other_port, other_seen = other
    n = len(other_seen)
    for path, words in [("/ok/redirect-other-host", "redirect target"), ("/ok/redirect-out-path", "redirect target"),
                        ("/ok/redirect-metadata", "redirect target"), ("/ok/redirect-loop", "redirects")]:
        with pytest.raises(FetchError) as e:
            fetch_bytes(f"http://127.0.0.1:{port}{path}", policy(port))
        assert words in e.value.message, (path, e.value)
    assert len(other_seen) == n  # the other host was never contacted


def test_size_and_time_are_bounded(site):
    port, _ = site
    with pytest.raises(FetchError) as e:
        fetch_bytes(f"http://127.0.0.1:{port}/ok/big", policy(port, max_bytes=1000))
    assert e.value.reason == "source_too_large"
    t = time.monotonic()
    with pytest.raises(FetchError) as e:  # no Content-Length: the streaming cap stops it
        fetch_bytes(f"http://127.0.0.1:{port}/ok/endless", policy(port, max_bytes=200_000))
    assert e.value.reason == "source_too_large"
    with pytest.raises(FetchError) as e:
        fetch_bytes(f"http://127.0.0.1:{port}/ok/slow", policy(port, timeout_s=0.5))
    assert "timed out" in e.value.message and time.monotonic() - t < 2.5
    with pytest.raises(FetchError) as e:
        fetch_bytes(f"http://127.0.0.1:{port}/ok/missing", policy(port))
    assert e.value.reason == "fetch_failed" and "404" in e.value.message


def test_loopback_refused_unless_allowed(site):
    port, seen = site
    before = len(seen)
    with pytest.raises(FetchError) as e:
        fetch_bytes(f"http://127.0.0.1:{port}/ok/img.png", policy(port, allow_private=False))
    assert e.value.reason == "address_not_allowed" and len(seen) == before


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/", "http://[::ffff:169.254.169.254]/latest/",
    "http://[::ffff:a9fe:a9fe]/latest/", "http://[fd00:ec2::254]/latest/", "http://metadata.google.internal/x",
    "http://METADATA.GOOGLE.INTERNAL./x", "http://2852039166/latest/", "http://0xa9.0xfe.0xa9.0xfe/latest/",
    "http://169.254.169.254.nip.io.invalid/", "http://[fe80::1]/x",
])
def test_metadata_and_link_local_always_refused(url):
    n = normalize_url(url)
    allow_all = FetchPolicy(allowed_urls=(f"{n.scheme}://{'[' + n.host + ']' if ':' in n.host else n.host}/",),
                            allow_private=True)
    with pytest.raises(FetchError) as e:
        fetch_bytes(url, allow_all)
    assert e.value.reason in ("address_not_allowed", "fetch_failed"), e.value  # .invalid never resolves


@pytest.mark.parametrize("ip", ["127.0.0.1", "10.1.2.3", "192.168.0.1", "172.16.5.5", "100.64.0.1", "::1",
                                "fc00::1", "::ffff:10.0.0.1", "0.0.0.0", "224.0.0.1"])
def test_private_addresses_need_explicit_permission(ip):
    with pytest.raises(FetchError) as e:
        ingest.check_address(ip, FetchPolicy(), "h")
    assert e.value.reason == "address_not_allowed"
    ingest.check_address(ip, FetchPolicy(allow_private=True), "h")  # allowed when configured
    ingest.check_address("93.184.216.34", FetchPolicy(), "h")  # a public address is fine


def test_allowlist_matches_normalised_scheme_host_port_and_segments():
    p = FetchPolicy(allowed_urls=("https://Images.Example.COM./ok/",))
    yes = ["https://images.example.com/ok/a.png", "HTTPS://IMAGES.EXAMPLE.COM:443/ok/a.png",
           "https://images.example.com/ok", "https://images.example.com/x/../ok/a.png"]
    no = ["https://images.example.com/okay/a.png", "http://images.example.com/ok/a.png",
          "https://images.example.com:8443/ok/a.png", "https://images.example.com.evil.com/ok/a.png",
          "https://evil.com/images.example.com/ok/a.png", "https://images.example.com/a/ok/a.png"]
    assert all(url_allowed(normalize_url(u), p) for u in yes)
    assert not any(url_allowed(normalize_url(u), p) for u in no)
    idn = FetchPolicy(allowed_urls=("http://bücher.example/",))
    assert url_allowed(normalize_url("http://xn--bcher-kva.example/a"), idn)


def test_connection_is_pinned_to_the_checked_address(site, monkeypatch):
    """DNS rebinding: the name resolves to an allowed address when checked and to another one later;
    the fetch connects to the checked address, and resolves once per hop."""
    port, _ = site
    calls = []
    real = socket.getaddrinfo

    def fake(host, p, *a, **kw):
        if host == "rebind.test":
            calls.append(host)
            ip = "127.0.0.1" if len(calls) == 1 else "169.254.169.254"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, p))]
        return real(host, p, *a, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    pol = FetchPolicy(allowed_urls=(f"http://rebind.test:{port}/ok/",), allow_private=True)
    assert fetch_bytes(f"http://rebind.test:{port}/ok/img.png", pol) == IMG
    assert calls == ["rebind.test"]
