"""`nightshift serve`'s HTTP API: OpenAI's Files and Batches endpoints over the store and
queue the command line uses. The server never runs a model: workers do.

Starlette on uvicorn: a small, well-kept ASGI core with nothing to generate (FastAPI
would add pydantic models for what jobs/batches.py already shapes), and
python-multipart's streaming parser, so an upload goes to disk as it arrives.

Each route is a thin door, like a command: it parses the request, calls one function
of jobs/files.py or jobs/batches.py, and answers JSON. Errors take OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, with its status codes; nothing
else, a traceback least of all, reaches a client (the server's log has it).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Callable

import orjson
from nightshift.jobs import batches, files, notify
from nightshift.jobs.errors import InvalidRequest, NightshiftError, NotFound, UploadTooLarge
from nightshift.jobs.store import Store
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger("nightshift.serve")

MAX_JSON_BYTES = 1 << 20  # a batch's parameters are a few hundred bytes
MAX_FIELD_BYTES = 1024  # an upload's fields other than the file (purpose)
BATCH_PAGE, BATCH_PAGE_MAX = 20, 100  # OpenAI's default and largest page of batches
FILE_PAGE_MAX = 10000  # and of files (its default is the largest)
_HTTP_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
               403: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error"}


def error(status: int, message: str, param: str | None = None,
          code: str | None = None) -> JSONResponse:
    """An OpenAI error body."""
    return JSONResponse({"error": {"message": message,
                                   "type": _HTTP_TYPES.get(status, "server_error"),
                                   "param": param, "code": code}}, status_code=status)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def create_app(store: Store, *, api_key: str | None, max_upload_bytes: int,
               submit: Callable, model_reference: Callable[[str], str | None]) -> Starlette:
    """The ASGI app over ``store``. ``submit`` stores and queues a file as a job
    (worker/dispatch.py's); ``model_reference`` says what a job records for a model
    a line names (worker/aliases.py's), None if unknown."""

    async def create_file(request: Request) -> Response:
        form = _Form(max_upload_bytes)
        try:
            await form.read(request)
        except ClientDisconnect:
            form.discard()
            return Response(status_code=400)
        purpose = form.fields.get("purpose")
        if form.upload is None or purpose is None:
            form.discard()
            missing = "file" if form.upload is None else "purpose"
            raise InvalidRequest(f"Missing required parameter: '{missing}'.", param=missing,
                                 code="missing_required_parameter")
        if purpose != files.PURPOSE:
            form.discard()
            raise InvalidRequest(f"purpose {purpose!r} is not supported: nightshift keeps "
                                 f"files for batches only (purpose {files.PURPOSE!r})",
                                 param="purpose")
        return _json(await run_in_threadpool(form.upload.keep, store, form.filename, purpose))

    def list_files(request: Request) -> Response:
        query = request.query_params
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidRequest(f"order must be 'asc' or 'desc', got {order!r}", param="order")
        return _json(files.list_page(
            store, after=query.get("after"), order=order, purpose=query.get("purpose"),
            limit=_limit(query.get("limit"), FILE_PAGE_MAX, FILE_PAGE_MAX)))

    def get_file(request: Request) -> Response:
        return _json(files.get(store, request.path_params["file_id"]))

    def delete_file(request: Request) -> Response:
        return _json(files.delete(store, request.path_params["file_id"]))

    def settle() -> None:
        # A deadline may pass with no worker running: its requests are expired (and the
        # --notify commands of jobs that ended run) before a batch or its files is read.
        notify.sweep(store)

    def file_content(request: Request) -> Response:
        settle()
        return StreamingResponse(files.content(store, request.path_params["file_id"]),
                                 media_type="application/octet-stream")

    async def create_batch(request: Request) -> Response:
        body = await _json_body(request)
        for unsupported in ("output_expires_after",):
            if body.get(unsupported) is not None:
                raise InvalidRequest(f"{unsupported} is not supported by nightshift: output "
                                     "files are kept with their jobs", param=unsupported)
        known = {"input_file_id", "endpoint", "completion_window", "metadata",
                 "output_expires_after"}
        for name in body:
            if name not in known:
                raise InvalidRequest(f"Unrecognized request argument supplied: {name}",
                                     param=name)
        return _json(await run_in_threadpool(
            lambda: batches.create(
                store, input_file_id=body.get("input_file_id"), endpoint=body.get("endpoint"),
                completion_window=body.get("completion_window"),
                metadata=body.get("metadata"), submit=submit,
                model_reference=model_reference)))

    def list_batches(request: Request) -> Response:
        settle()
        query = request.query_params
        return _json(batches.list_page(store, after=query.get("after"),
                                       limit=_limit(query.get("limit"), BATCH_PAGE,
                                                    BATCH_PAGE_MAX)))

    def get_batch(request: Request) -> Response:
        settle()
        return _json(batches.get(store, request.path_params["batch_id"]))

    def cancel_batch(request: Request) -> Response:
        return _json(batches.cancel(store, request.path_params["batch_id"]))

    routes = [
        Route("/v1/files", create_file, methods=["POST"]),
        Route("/v1/files", list_files, methods=["GET"]),
        Route("/v1/files/{file_id}", get_file, methods=["GET"]),
        Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
        Route("/v1/batches", create_batch, methods=["POST"]),
        Route("/v1/batches", list_batches, methods=["GET"]),
        Route("/v1/batches/{batch_id}", get_batch, methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
    ]
    handlers = {
        NotFound: lambda _r, exc: error(404, str(exc)),
        UploadTooLarge: lambda _r, exc: error(413, str(exc), exc.param, exc.code),
        InvalidRequest: lambda _r, exc: error(400, str(exc), exc.param, exc.code),
        # Ours, so its message is meant for people (a database that cannot be opened).
        NightshiftError: lambda _r, exc: error(500, str(exc)),
        HTTPException: lambda _r, exc: error(exc.status_code, _http_message(exc)),
        Exception: _server_error,
    }
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.add_middleware(Guard, api_key=api_key)
    return app


def _http_message(exc: HTTPException) -> str:
    if exc.status_code == 404:
        return "Unknown request URL. nightshift serves /v1/files and /v1/batches."
    if exc.status_code == 405:
        return "Method not allowed for this URL."
    return exc.detail


def _server_error(_request: Request, _exc: Exception) -> JSONResponse:
    # Starlette raises the exception again once this is sent: uvicorn logs its traceback.
    return error(500, "The server had an error while processing your request (its log "
                 "says more).")


def _json(data) -> Response:
    return Response(orjson.dumps(data), media_type="application/json")


def _limit(text: str | None, default: int, most: int) -> int:
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= most:
        raise InvalidRequest(f"limit must be an integer from 1 to {most}, got {text!r}",
                             param="limit")
    return value


async def _json_body(request: Request) -> dict:
    """The request's JSON object. application/json only: a web page cannot send that
    to another site without asking first (CORS), which this server never allows."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise InvalidRequest("send the parameters as JSON (Content-Type: application/json)")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise UploadTooLarge(f"the request body is larger than {MAX_JSON_BYTES:,} bytes")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return data


class _Form:
    """An upload's multipart/form-data, read as it arrives: the ``file`` part straight
    into a ``files.Upload`` on disk, the other fields (``purpose``) into ``fields``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.fields: dict[str, str] = {}
        self.upload: files.Upload | None = None
        self.filename = "upload.jsonl"
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._header = [b"", b""]
        self._field: str | None = None  # the field being read, None for the file
        self._value = bytearray()

    async def read(self, request: Request) -> None:
        """Read the whole body; a problem found on the way stops the writing, not the
        reading: a client sends its whole request before it reads the answer, so one
        answered early sees a broken connection instead of the error.

        Raises:
            InvalidRequest: not multipart/form-data, a field that is not accepted, or
                UploadTooLarge: the file is over the limit. Nothing is kept then.
        """
        kind, options = parse_options_header(request.headers.get("content-type", ""))
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise InvalidRequest("upload the file as multipart/form-data, with the fields "
                                 "purpose and file", param="file")
        try:
            parser = MultipartParser(boundary, self._callbacks())
        except (ValueError, MultipartParseError) as exc:
            raise InvalidRequest(f"the upload is not valid multipart/form-data: {exc}",
                                 param="file") from None
        problem: Exception | None = None
        more = True
        while more:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk, more = message.get("body", b""), message.get("more_body", False)
            if problem is None and chunk:
                try:
                    parser.write(chunk)
                except (InvalidRequest, MultipartParseError) as exc:
                    problem = exc
                    self.discard()
        if problem is None:
            try:
                parser.finalize()
            except MultipartParseError as exc:
                problem = exc
        if problem is None and not self.ended:
            problem = InvalidRequest("the upload ended before its closing boundary",
                                     param="file")
        if problem is not None:
            self.discard()
            if isinstance(problem, InvalidRequest):
                raise problem
            raise InvalidRequest(f"the upload is not valid multipart/form-data: {problem}",
                                 param="file")

    def discard(self) -> None:
        if self.upload is not None:
            self.upload.discard()
            self.upload = None

    def _callbacks(self) -> dict:
        def on_part_begin() -> None:
            self._headers = {}

        def on_header_field(data: bytes, start: int, end: int) -> None:
            self._header[0] += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            self._header[1] += data[start:end]

        def on_header_end() -> None:
            self._headers[self._header[0].lower()] = self._header[1]
            self._header = [b"", b""]

        def on_headers_finished() -> None:
            _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
            name = options.get(b"name", b"").decode("utf-8", "replace")
            if name == "file":
                if self.upload is not None:
                    raise InvalidRequest("one file per upload", param="file")
                filename = options.get(b"filename")
                if filename:
                    self.filename = filename.decode("utf-8", "replace")
                self.upload = files.Upload(self.limit)
                self._field = None
            elif name == "purpose":
                self._field, self._value = name, bytearray()
            elif name.startswith("expires_after"):
                raise InvalidRequest("expires_after is not supported by nightshift: files "
                                     "are kept until deleted", param="expires_after")
            else:
                raise InvalidRequest(f"Unrecognized request argument supplied: {name}",
                                     param=name)

        def on_part_data(data: bytes, start: int, end: int) -> None:
            if self._field is None:
                self.upload.write(data[start:end])
                return
            self._value += data[start:end]
            if len(self._value) > MAX_FIELD_BYTES:
                raise InvalidRequest(f"{self._field} is longer than {MAX_FIELD_BYTES} bytes",
                                     param=self._field)

        def on_part_end() -> None:
            if self._field is not None:
                self.fields[self._field] = self._value.decode("utf-8", "replace")

        def on_end() -> None:
            self.ended = True

        return {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                "on_header_value": on_header_value, "on_header_end": on_header_end,
                "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
                "on_part_end": on_part_end, "on_end": on_end}


class Guard:
    """ASGI middleware in front of every route: refuses requests from web pages (an
    ``Origin`` header: API clients send none, and a page must not drive the queue of
    the machine it runs on), a ``Host`` that is not this machine when there is no key
    (DNS rebinding), and a wrong or missing key when there is one (``Authorization:
    Bearer KEY``, compared in constant time)."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(Headers(scope=scope))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, headers: Headers) -> Response | None:
        if "origin" in headers:
            return error(403, "requests from web pages are refused (the request has an "
                         "Origin header)")
        if self.key is None:
            if not _local_host(headers.get("host", "")):
                return error(403, "this server has no API key and answers only requests "
                             "addressed to this machine (localhost, 127.0.0.1, [::1])")
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self.key):
            return error(401, "Incorrect API key provided. Give the key nightshift serve "
                         "was started with (--api-key / NIGHTSHIFT_API_KEY) as the "
                         "client's api_key.", code="invalid_api_key")
        return None


def _local_host(host: str) -> bool:
    """Whether a ``Host`` header names this machine: localhost or a loopback address,
    with or without a port."""
    name = host.rsplit("]", 1)[0].lstrip("[") if host.startswith("[") else host.split(":")[0]
    return is_loopback(name)
