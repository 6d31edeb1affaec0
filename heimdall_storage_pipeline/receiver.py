"""``heimdall-storage events``: an HTTP receiver for bucket notifications (SeaweedFS filer webhooks,
MinIO/S3 event notifications) that stores each object event of a policy bucket before answering 200."""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa

from heimdall_storage_pipeline.core.clock import utc_now
from heimdall_storage_pipeline.core.errors import redact
from heimdall_storage_pipeline.core.events import EventFormatError, EventLog, parse_events

log = logging.getLogger("heimdall_storage_pipeline.events")
DEFAULT_PORT = 8002
DEFAULT_MAX_BODY = 1 << 20
DEFAULT_HEARTBEAT_SECONDS = 10.0
MIN_TOKEN_LENGTH = 16  # off loopback: anything shorter is guessable
TOKEN_ENV = "HEIMDALL_EVENTS_TOKEN"
AMQP_URL_ENV = "HEIMDALL_EVENTS_AMQP_URL"  # the way to pass a URL with a password: argv shows in ps
# A connection silent this long (headers or body trickling in, or idle between requests) is closed,
# so that a slow or stalled client cannot hold a thread for ever.
REQUEST_TIMEOUT_SECONDS = 30.0
# Connections served at once, each on a thread; one more is answered 503 at once, without a thread.
MAX_CONCURRENT_REQUESTS = 32
_BUSY_BODY = json.dumps({"error": "too many requests at once; retry later"}).encode()
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class EventReceiver:
    """What the HTTP handler does, without HTTP: authenticate, parse, keep policy buckets' events, store."""

    def __init__(self, events: EventLog, buckets: set[str], token: str = "", max_body: int = DEFAULT_MAX_BODY,
                 heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS) -> None:
        self.events, self.buckets, self.token = events, buckets, token
        self.max_body, self.heartbeat_seconds = max_body, heartbeat_seconds
        self._unrecorded_gaps: set[str] = set()  # buckets whose events could not be stored, gap not yet recorded
        self._lock = threading.Lock()

    @property
    def alive_seconds(self) -> float:
        return 3 * self.heartbeat_seconds  # a receiver missing three heartbeats is taken for dead

    def authorized(self, header: str | None) -> bool:
        if not self.token:
            return True
        given = (header or "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.token.encode())

    def receive(self, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            events = parse_events(body)
        except EventFormatError as exc:
            self.lost(self.buckets)
            return 400, {"error": str(exc)}
        kept = [event for event in events if event.bucket in self.buckets]
        try:
            self._record_gaps()
            stored = self.events.append(kept) if kept else 0
        except sa.exc.SQLAlchemyError as exc:
            self.lost(event.bucket for event in kept)
            log.error("cannot store %d event(s): %s", len(kept), _one_line(exc))
            return 503, {"error": "the event log is unavailable; retry later"}
        return 200, {"stored": stored, "duplicates": len(kept) - stored, "ignored": len(events) - len(kept)}

    def lost(self, buckets: Iterable[str]) -> None:
        """Events of these buckets were refused or not stored: their streams get a gap (at the next write)."""
        with self._lock:
            self._unrecorded_gaps.update(buckets)

    def _record_gaps(self) -> None:
        with self._lock:
            lost, self._unrecorded_gaps = self._unrecorded_gaps, set()
        try:
            if lost:
                self.events.mark_gap(lost, f"the receiver refused or could not store events at "
                                           f"{utc_now().isoformat()}")
        except sa.exc.SQLAlchemyError:
            with self._lock:
                self._unrecorded_gaps |= lost
            raise

    def start(self) -> None:
        self.events.mark_gap(self.buckets, f"the receiver started at {utc_now().isoformat()}", self.alive_seconds)

    def heartbeat(self) -> None:
        try:
            self._record_gaps()
            self.events.heartbeat(self.buckets, self.alive_seconds)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("heartbeat failed: %s", _one_line(exc))

    def stop(self) -> None:
        """Tell inventories at once that nobody listens any more."""
        self.events.heartbeat(self.buckets, 0)


def _one_line(exc: BaseException) -> str:
    return redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def make_handler(receiver: EventReceiver, timeout: float = REQUEST_TIMEOUT_SECONDS
                 ) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "heimdall-storage-events"

        def _answer(self, status: int, document: dict[str, Any]) -> None:
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status == 401:
                self.send_header("WWW-Authenticate", "Bearer")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            # MinIO checks that a webhook endpoint answers before it accepts the target.
            self._answer(200, {"status": "ok", "buckets": sorted(receiver.buckets)})

        do_HEAD = do_GET

        def do_POST(self) -> None:
            if not receiver.authorized(self.headers.get("Authorization")):
                self.close_connection = True
                return self._answer(401, {"error": "missing or wrong bearer token"})
            length = self.headers.get("Content-Length")
            # isdigit alone takes '²' and other digits int() refuses.
            if length is None or not (length.isascii() and length.isdigit()):
                self.close_connection = True
                return self._answer(411, {"error": "a Content-Length is required"})
            if int(length) > receiver.max_body:
                self.close_connection = True  # the body is not read: whatever it announced is lost
                receiver.lost(receiver.buckets)
                return self._answer(413, {"error": f"the body is larger than {receiver.max_body} bytes"})
            try:
                body = self.rfile.read(int(length))
            except TimeoutError:
                self.close_connection = True  # the body never came whole: whatever it announced is lost
                receiver.lost(receiver.buckets)
                return self._answer(408, {"error": f"the body did not arrive within {timeout:g} s"})
            self._answer(*receiver.receive(body))

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)  # the request line: never a header

    Handler.timeout = timeout  # the socket's timeout for every read and write
    return Handler


class BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_requests`` at once; beyond that, 503 and the connection closed."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_requests: int,
                 on_refused: Callable[[], None]) -> None:
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_requests)
        self.on_refused = on_refused

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.on_refused()
            try:
                request.settimeout(1.0)  # on the accepting thread: never wait long for a client
                request.sendall(_BUSY)
            except OSError:
                pass
            finally:
                self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


@dataclass(frozen=True)
class AmqpSource:
    """Where MinIO's AMQP target (notify_amqp) publishes: its exchange and routing key, and our queue."""

    url: str
    exchange: str = "bucketevents"
    exchange_type: str = "fanout"
    routing_key: str = "bucketlogs"
    queue: str = "heimdall-storage-events"


def consume_amqp(receiver: EventReceiver, source: AmqpSource, stop: threading.Event) -> None:
    """Store each message's notification, then acknowledge it: RabbitMQ keeps what is not stored yet."""
    from kombu import Connection, Exchange, Queue

    def on_message(message: Any) -> None:
        status, answer = receiver.receive(message.body if isinstance(message.body, bytes) else message.body.encode())
        if status == 200:
            message.ack()
        elif status == 503:
            stop.wait(1.0)  # the event log is down: back off, then let RabbitMQ deliver it again
            message.requeue()
        else:
            log.warning("dropped an AMQP message that is not a notification: %s", answer["error"])
            message.reject()

    queue = Queue(source.queue, Exchange(source.exchange, type=source.exchange_type, durable=True),
                  routing_key=source.routing_key, durable=True)
    where = redact(source.url)
    while not stop.is_set():
        try:
            with Connection(source.url, connect_timeout=10) as connection, \
                    connection.Consumer(queue, on_message=on_message) as consumer:
                consumer.qos(prefetch_count=100)
                log.info("consuming queue %s (exchange %s) at %s", source.queue, source.exchange, where)
                while not stop.is_set():
                    try:
                        connection.drain_events(timeout=1)
                    except TimeoutError:
                        continue
        except Exception as exc:  # kombu's and the socket's errors alike: reconnect
            log.error("AMQP at %s: %s; reconnecting", where, _one_line(exc))
            stop.wait(2.0)


def serve(receiver: EventReceiver, host: str, port: int, stop: threading.Event | None = None,
          amqp: AmqpSource | None = None, *, timeout: float = REQUEST_TIMEOUT_SECONDS,
          max_requests: int = MAX_CONCURRENT_REQUESTS, bound: Callable[[int], None] | None = None) -> None:
    """Receive until ``stop`` is set; ``bound`` is told the port bound (0 asks for a free one)."""
    # A refused request may have carried events: its buckets' streams get a gap.
    server = BoundedHTTPServer((host, port), make_handler(receiver, timeout), max_requests,
                               lambda: receiver.lost(receiver.buckets))
    if bound is not None:
        bound(server.server_address[1])
    stop = stop or threading.Event()
    receiver.start()
    threading.Thread(target=server.serve_forever, name="heimdall-events-http", daemon=True).start()
    if amqp is not None:
        threading.Thread(target=consume_amqp, args=(receiver, amqp, stop), name="heimdall-events-amqp",
                         daemon=True).start()
    log.info("receiving bucket events for %s on http://%s:%d/", ", ".join(sorted(receiver.buckets)), host,
             server.server_address[1])
    try:
        while not stop.wait(receiver.heartbeat_seconds):
            receiver.heartbeat()
    finally:
        server.shutdown()
        server.server_close()
        receiver.stop()


def add_events_command(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "events", help="receive bucket notifications (SeaweedFS webhook, MinIO webhook) for incremental inventories")
    parser.add_argument("--host", default=os.environ.get("HEIMDALL_EVENTS_HOST", "127.0.0.1"),
                        help="address to bind (default 127.0.0.1; another needs $HEIMDALL_EVENTS_TOKEN)")
    parser.add_argument("--port", default=os.environ.get("HEIMDALL_EVENTS_PORT", str(DEFAULT_PORT)),
                        help=f"port to bind (default {DEFAULT_PORT})")
    parser.add_argument("--policy", default=None, help="policy file (default: $HEIMDALL_STORAGE_POLICY or the "
                                                       "shipped one); events of its enabled buckets are kept")
    parser.add_argument("--database-url",
                        default=os.environ.get("HEIMDALL_AUDIT_DB_URL") or os.environ.get("DAGSTER_PG_URL"),
                        help="where events are stored (default: $HEIMDALL_AUDIT_DB_URL, else $DAGSTER_PG_URL)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY,
                        help=f"larger notifications are refused with 413 (default {DEFAULT_MAX_BODY})")
    parser.add_argument("--amqp-url", default=None,
                        help=f"also consume MinIO's AMQP target from RabbitMQ; a URL without a password only "
                             f"(the command line shows in ps): set ${AMQP_URL_ENV}, e.g. "
                             f"amqp://user:password@127.0.0.1:5672//, instead")
    parser.add_argument("--amqp-exchange", default="bucketevents", help="notify_amqp's exchange (default bucketevents)")
    parser.add_argument("--amqp-exchange-type", default="fanout", help="notify_amqp's exchange_type (default fanout)")
    parser.add_argument("--amqp-routing-key", default="bucketlogs",
                        help="notify_amqp's routing_key (default bucketlogs)")
    parser.add_argument("--amqp-queue", default="heimdall-storage-events",
                        help="the durable queue this receiver binds and consumes (default heimdall-storage-events)")
    parser.add_argument("--heartbeat-seconds", type=float, default=DEFAULT_HEARTBEAT_SECONDS,
                        help="how often the receiver says it is alive; silent for 3 of these, inventories list in full")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    from heimdall_storage_pipeline.core.errors import StorageCleanupError
    from heimdall_storage_pipeline.core.migrations import apply_migrations
    from heimdall_storage_pipeline.core.policy import PolicyError, load_policy
    from heimdall_storage_pipeline.core.references import make_engine
    from heimdall_storage_pipeline.core.settings import database_url_problem

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = os.environ.get(TOKEN_ENV, "")
    if not args.port.isdigit() or int(args.port) > 65535:
        print(f"--port (HEIMDALL_EVENTS_PORT) {args.port!r} is not a port; use 0..65535", file=sys.stderr)
        return 2
    if not args.database_url:
        print("no event database: set HEIMDALL_AUDIT_DB_URL (or DAGSTER_PG_URL) or pass --database-url",
              file=sys.stderr)
        return 2
    try:
        password = urlsplit(args.amqp_url).password if args.amqp_url else None
    except ValueError:
        password = "unknown"  # not a URL: whatever it holds, refused like one with a password
    if password is not None:
        print(f"--amqp-url holds a password, which any user of this machine can read (ps); "
              f"set {AMQP_URL_ENV} instead", file=sys.stderr)
        return 2
    amqp_url = args.amqp_url or os.environ.get(AMQP_URL_ENV)
    problem = database_url_problem(args.database_url, "--database-url (HEIMDALL_AUDIT_DB_URL)")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and not token:
        print(f"binding {args.host} exposes the receiver; set {TOKEN_ENV} (the senders' bearer token) or bind "
              f"127.0.0.1", file=sys.stderr)
        return 2
    if not loopback and (len(token) < MIN_TOKEN_LENGTH or "change-me" in token):
        print(f"{TOKEN_ENV} is the example's placeholder or shorter than {MIN_TOKEN_LENGTH} characters, too weak for "
              f"a receiver on {args.host}; set a random one (openssl rand -hex 24)", file=sys.stderr)
        return 2
    try:
        buckets = {bucket.name for bucket in load_policy(args.policy).enabled_buckets()}
        engine = make_engine(args.database_url)
        apply_migrations(engine, "audit")
    except (PolicyError, StorageCleanupError) as exc:
        print(f"FAILED {exc}", file=sys.stderr)
        return 1
    receiver = EventReceiver(EventLog(engine), buckets, token, args.max_body_bytes, args.heartbeat_seconds)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        amqp = AmqpSource(amqp_url, args.amqp_exchange, args.amqp_exchange_type, args.amqp_routing_key,
                          args.amqp_queue) if amqp_url else None
        serve(receiver, args.host, int(args.port), stop, amqp)
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc.strerror}; choose another --port", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    except sa.exc.SQLAlchemyError as exc:
        print(f"FAILED the event database: {_one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    return 0
