"""An HTTP proxy in front of the real S3 server that can stall or refuse chosen requests.

Requests pass through unchanged (the Host header too, so their signatures still hold); a test's
``fault`` hook sees each request first and may act (stall, change the world) and answer instead.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# (method, path with query) -> None to pass the request on, or (status, body) to answer it.
Fault = Callable[[str, str], tuple[int, bytes] | None]


@contextmanager
def faulty_proxy(target: str, fault: Fault) -> Iterator[str]:
    """Serve on a free loopback port in front of ``target`` (host:port); yields the proxy's host:port."""
    host, port = target.rsplit(":", 1)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # the suite's output is not the place
            pass

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            answer = fault(self.command, self.path)
            if answer is not None:
                status, payload = answer
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            upstream = http.client.HTTPConnection(host, int(port), timeout=60)
            try:
                upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    upstream.putheader(name, value)
                upstream.endheaders(body)
                response = upstream.getresponse()
                payload = response.read()
                head = self.command == "HEAD"  # its Content-Length is the object's size: kept as sent
                self.send_response(response.status)
                dropped = {"transfer-encoding", "connection"} | (set() if head else {"content-length"})
                for name, value in response.getheaders():
                    if name.lower() not in dropped:
                        self.send_header(name, value)
                if not head:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if not head:
                    self.wfile.write(payload)
            finally:
                upstream.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def s3_error(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
            f"<Resource>/</Resource><RequestId>proxy</RequestId></Error>").encode()
