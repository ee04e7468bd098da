"""`tml-recap serve`: the prediction service (FastAPI on uvicorn) in front of an artifact.

Endpoints:
    POST /predict   a batch of records (JSON or Arrow IPC, serving/requests.py) -> scores; `?tasks=a,b`
                    chooses the probabilities returned
    GET  /healthz   200 while the process serves HTTP
    GET  /readyz    200 once the artifact is loaded and has scored a warm-up batch, 503 before
    GET  /metrics   Prometheus: requests by status and format, errors by kind, request latency, records
                    per model batch, requests waiting for a batch, records scored

The artifact loads in the background after the port is open (so /healthz answers during a slow load).
Requests are decoded by the reader's ranking decoder (serving/schema.py), batched (serving/batcher.py) and
answered in their own format. A bad request gets a 4xx naming the field and changes nothing else; an
unexpected error gets a 500 and is logged. SIGTERM / SIGINT: stop accepting connections, score what waits
in the batcher at once, answer the requests in flight (at most `drain_seconds`), log "drained; stopped",
then end the process with the signal it caught (uvicorn's way: status 143 in a shell for SIGTERM).

Example:
    serve(ServeOptions(artifact="artifacts/local", port=8080))
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import threading
import time
from collections.abc import Callable

import torch
from fastapi import FastAPI, Request, Response

from tml.core.distributed import configure_cpu_threads
from tml.core.errors import UserError
from tml.ml_logging.log import get_logger
from tml.projects.home.recap.serving.artifact import Artifact, ArtifactError, read_meta, sample_inputs
from tml.projects.home.recap.serving.batcher import DynamicBatcher
from tml.projects.home.recap.serving.outputs import output_table
from tml.projects.home.recap.serving.requests import (
    ARROW,
    RequestError,
    arrow_response,
    body_format,
    json_response,
    parse_body,
    parse_tasks,
)
from tml.projects.home.recap.serving.schema import decode_plan, decode_rows, program_inputs
from tml.reader.decoder import DataError

logger = get_logger(__name__)


class ServeError(UserError, ValueError):
    """Settings the service cannot run with (a flag out of range, a port it cannot listen on)."""


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """Settings of `tml-recap serve` (docs/serving.md).

    Args:
        artifact: the artifact folder.
        host, port: where to listen (port 0: any free port, logged).
        max_batch_records: rows per model call at most.
        max_wait_ms: how long a batch waits for more requests after its first.
        max_request_records: rows per request at most (<= max_batch_records).
        max_request_bytes: body size per request at most.
        drain_seconds: how long SIGTERM waits for requests in flight.
        runtime: artifact runtime ("auto", "aoti", "exported_program").
        threads: torch intra-op threads of the model; None: OMP_NUM_THREADS, else the cores minus one
            (the event loop decodes requests meanwhile, and OpenMP threads that compete for cores wait).
    """

    artifact: str
    host: str = "127.0.0.1"
    port: int = 8080
    max_batch_records: int = 1024
    max_wait_ms: float = 2.0
    max_request_records: int = 1024
    max_request_bytes: int = 64 << 20
    drain_seconds: float = 30.0
    runtime: str = "auto"
    threads: int | None = None

    def check(self) -> None:
        if self.max_batch_records < 1 or self.max_request_records < 1 or self.max_request_bytes < 1:
            raise ServeError(
                "--max-batch-records, --max-request-records and --max-request-bytes must be >= 1"
            )
        if self.max_request_records > self.max_batch_records:
            raise ServeError(
                f"--max-request-records {self.max_request_records} exceeds --max-batch-records "
                f"{self.max_batch_records}: one request must fit in one batch"
            )
        if self.max_wait_ms < 0 or self.drain_seconds < 0:
            raise ServeError("--max-wait-ms and --drain-seconds must be >= 0")
        if not 0 <= self.port < 65536:
            raise ServeError(f"--port {self.port}: expected 0-65535")


class _Metrics:
    def __init__(self, max_batch: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tml_serve_requests", "Requests to /predict", ["status", "format"], registry=self.registry
        )
        self.errors = Counter(
            "tml_serve_errors", "Failed /predict requests (client: 4xx, server: 5xx)", ["kind"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "tml_serve_request_seconds",
            "Time from receiving a /predict body to the response",
            registry=self.registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
        )
        buckets = sorted({2**i for i in range(max(1, max_batch.bit_length()))} | {max_batch})
        self.batch = Histogram(
            "tml_serve_batch_records", "Records per model call", registry=self.registry, buckets=buckets
        )
        self.queue = Gauge(
            "tml_serve_queue_depth", "Requests not yet handed to the model", registry=self.registry
        )
        self.records = Counter("tml_serve_records", "Records scored", registry=self.registry)


class Service:
    """The state behind the app: the artifact (once loaded), its decode plan, the batcher, metrics."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.meta = read_meta(options.artifact)  # a wrong path fails before the port opens
        self.plan = decode_plan(self.meta["inputs"], with_ids=False)
        self.columns = self.plan.columns()
        self.tasks = list(self.meta["tasks"])
        self.artifact: Artifact | None = None
        self.ready = False
        self.load_error: str | None = None
        self.metrics = _Metrics(options.max_batch_records)
        self.metrics.queue.set_function(lambda: self.batcher.depth if self.batcher else 0)
        self.batcher: DynamicBatcher | None = None
        self.on_load_failure: Callable[[], None] = lambda: None
        self.loop: asyncio.AbstractEventLoop | None = None

    def load(self) -> None:
        try:
            artifact = Artifact(self.options.artifact, self.options.runtime)
            artifact(*sample_inputs(self.meta["inputs"], 2))  # warm-up: first calls allocate and plan
        except Exception as error:
            self.load_error = f"{type(error).__name__}: {error}"
            logger.error("cannot load %s: %s", self.options.artifact, self.load_error)
            self.on_load_failure()
            return
        self.artifact = artifact
        self.ready = True
        logger.info("ready: %s (runtime %s)", self.options.artifact, artifact.runtime)

    def run(self, chunk) -> dict[str, torch.Tensor]:
        assert self.artifact is not None
        return self.artifact(*program_inputs(chunk, self.plan))

    async def predict(self, body: bytes, content_type: str | None, tasks: str | None) -> tuple[bytes, str]:
        kind = body_format(content_type)
        if len(body) > self.options.max_request_bytes:
            raise RequestError(
                413,
                f"body of {len(body)} bytes, at most {self.options.max_request_bytes} (--max-request-bytes)",
            )
        if not self.ready:
            raise RequestError(503, f"not ready: {self.load_error or 'the artifact is loading'}")
        wanted = parse_tasks(tasks, self.tasks, self.meta["kind"])
        table = parse_body(body, kind, self.columns, self.options.max_request_records)
        try:
            chunk = decode_rows(table, "request", self.plan)
        except DataError as error:
            raise RequestError(422, str(error)) from None
        assert self.batcher is not None
        outputs = await self.batcher.submit(chunk)
        self.metrics.records.inc(chunk.num_rows)
        if kind == ARROW:
            if "probabilities" in outputs:
                keep = [self.tasks.index(t) for t in wanted]
                outputs = dict(outputs, probabilities=outputs["probabilities"][:, keep])
            return arrow_response(output_table({}, outputs, wanted)), ARROW
        return json_response(outputs, self.tasks, wanted), "application/json"


def build_app(service: Service):
    """The FastAPI app of `service`."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher = DynamicBatcher(
            service.run,
            service.options.max_batch_records,
            service.options.max_wait_ms,
            service.metrics.batch.observe,
        )
        service.batcher.start()
        service.loop = asyncio.get_running_loop()
        threading.Thread(target=service.load, name="load-artifact", daemon=True).start()
        yield
        service.ready = False
        await service.batcher.stop()
        # uvicorn ends the process by re-raising the signal it caught, which runs no destructors: the
        # artifact is released here, so an AOTInductor package deletes the copy it extracted to $TMPDIR.
        service.artifact = None
        logger.info("drained; stopped")

    app = FastAPI(title="tml-recap serve", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(response: Response) -> dict:
        if not service.ready:
            response.status_code = 503
            return {
                "status": "loading" if service.load_error is None else "failed",
                "error": service.load_error,
            }
        return {"status": "ready", "runtime": service.artifact.runtime, "kind": service.meta["kind"]}

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        start = time.perf_counter()
        content_type = request.headers.get("content-type")
        label = "arrow" if (content_type or "").startswith(ARROW) else "json"
        try:
            declared = _content_length(request.headers.get("content-length"))
            if declared > service.options.max_request_bytes:
                raise RequestError(
                    413,
                    f"body of {declared} bytes, at most {service.options.max_request_bytes} (--max-request-bytes)",
                )
            body = await request.body()
            content, media = await service.predict(body, content_type, request.query_params.get("tasks"))
            status = 200
        except RequestError as error:
            status, content, media = error.status, _error(str(error)), "application/json"
        except ArtifactError as error:  # inputs the decoder passed but the artifact refused
            status, content, media = 422, _error(str(error)), "application/json"
        except Exception as error:
            logger.exception("POST /predict failed")
            status, content, media = (
                500,
                _error(f"internal error: {type(error).__name__}: {error}"),
                "application/json",
            )
        service.metrics.requests.labels(str(status), label).inc()
        if status >= 400:
            service.metrics.errors.labels("client" if status < 500 else "server").inc()
        service.metrics.latency.observe(time.perf_counter() - start)
        return Response(content, status_code=status, media_type=media)

    return app


def _content_length(header: str | None) -> int:
    try:
        return int(header or 0)
    except ValueError:
        raise RequestError(400, f"Content-Length {header!r} is not a number") from None


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def serve(options: ServeOptions) -> None:
    """Listen and serve until SIGTERM / SIGINT (module docstring)."""
    import uvicorn

    options.check()
    service = Service(options)
    threads = configure_cpu_threads(options.threads, reserved=1)
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without it every
    # keep-alive response (headers and body written apart) waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((options.host, options.port))
    except OSError as error:
        raise ServeError(
            f"--host {options.host} --port {options.port}: cannot listen there: {error}"
        ) from None
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        build_app(service),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=options.drain_seconds,
        lifespan="on",
    )
    logger.info(
        "serving %s on http://%s:%d (POST /predict, GET /healthz /readyz /metrics; %d torch threads)",
        options.artifact,
        options.host,
        port,
        threads,
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # SIGTERM / SIGINT: requests waiting for company in the batcher are scored now.
            if service.batcher is not None and service.loop is not None:
                service.loop.call_soon_threadsafe(service.batcher.drain)
            super().handle_exit(sig, frame)

    server = Server(config)
    service.on_load_failure = lambda: setattr(server, "should_exit", True)  # an unusable service exits
    server.run(sockets=[sock])
    if service.load_error is not None:
        raise ArtifactError(f"{options.artifact}: the artifact did not load: {service.load_error}")
