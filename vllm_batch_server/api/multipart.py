"""A streaming multipart/form-data reader for uploads.

Starlette's `request.form()` spools a file part to a temporary file outside our data directory and only then
hands it over; here the file part is written straight into our upload area as it arrives, and the size limit
is enforced on the bytes received, so an oversized upload is refused without ever being stored whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from vllm_batch_server.api.errors import APIError, bad_request
from vllm_batch_server.api.params import declared_length
from vllm_batch_server.store.blobs import Blobs, TooLarge, Upload

MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 32
# What multipart framing and the small fields add around the file part at most.
ENVELOPE_SLACK = 1024 * 1024


def too_large(limit: int) -> APIError:
    return APIError(413, f"The file is larger than the maximum of {limit} bytes this server accepts.",
                    param="file", code="file_too_large")


@dataclass
class UploadForm:
    fields: dict[str, str] = field(default_factory=dict)
    upload: Upload | None = None
    filename: str | None = None


class _Collector:
    """The parser's callbacks: routes the `file` part to disk and keeps the small fields."""

    def __init__(self, blobs: Blobs, limit: int, digest: bool) -> None:
        self.blobs = blobs
        self.limit = limit
        self.digest = digest
        self.form = UploadForm()
        self.finished = False
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._value = bytearray()
        self._to_file = False

    def on_part_begin(self) -> None:
        self._headers = {}
        self._name = None
        self._value = bytearray()
        self._to_file = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise bad_request("Each multipart part needs a Content-Disposition: form-data header with a name.",
                              code="invalid_multipart")
        self._name = options[b"name"].decode("utf-8", "replace")
        if self._name == "file":
            if self.form.upload is not None:
                raise bad_request("Send exactly one 'file' part.", param="file")
            self.form.filename = options.get(b"filename", b"upload.jsonl").decode("utf-8", "replace")
            self.form.upload = self.blobs.new_upload(self.limit, digest=self.digest)
            self._to_file = True
        elif len(self.form.fields) >= MAX_FIELDS:
            raise bad_request("Too many form fields.", code="invalid_multipart")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._to_file:
            assert self.form.upload is not None
            self.form.upload.write(data[start:end])
        else:
            self._value += data[start:end]
            if len(self._value) > MAX_FIELD_BYTES:
                raise bad_request(f"The form field {self._name!r} is too long.", param=self._name)

    def on_part_end(self) -> None:
        if not self._to_file and self._name is not None:
            try:
                self.form.fields[self._name] = self._value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise bad_request(f"The form field {self._name!r} is not valid UTF-8.", param=self._name) from exc

    def on_end(self) -> None:
        self.finished = True


async def read_upload(request: Request, blobs: Blobs, limit: int, *, digest: bool = False) -> UploadForm:
    """Parse the request's multipart body; the caller owns (commits or discards) `form.upload`, which has a
    sha256 of its content when `digest` is set."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise APIError(415, "Uploads must be sent as multipart/form-data.", code="unsupported_media_type")
    if not options.get(b"boundary"):
        raise bad_request("Uploads must be sent as multipart/form-data with a boundary.", code="invalid_multipart")
    declared = declared_length(request)
    if declared is not None and declared > limit + ENVELOPE_SLACK:
        raise too_large(limit)

    collector = _Collector(blobs, limit, digest)
    callbacks = {name: getattr(collector, name) for name in (
        "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
        "on_part_data", "on_part_end", "on_end")}
    try:
        parser = MultipartParser(options[b"boundary"], callbacks)  # type: ignore[arg-type]
    except FormParserError as exc:  # e.g. a boundary longer than the parser allows: the caller's mistake
        raise bad_request(f"Malformed multipart body: {exc}", code="invalid_multipart") from exc
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
        if not collector.finished:
            raise bad_request("The multipart body ended before its closing boundary.", code="invalid_multipart")
    except BaseException as exc:
        # Whatever went wrong, the partial upload was never acknowledged: it must not stay on disk.
        _discard(collector)
        if isinstance(exc, ClientDisconnect):
            # The uploader went away: nobody will read an answer and nothing is wrong with the server, so
            # not an unhandled error (with a traceback in the log), just a refused request.
            raise bad_request("The client disconnected before the upload was complete.",
                              code="client_disconnected") from exc
        if isinstance(exc, TooLarge):
            raise too_large(limit) from exc
        if isinstance(exc, FormParserError):
            raise bad_request(f"Malformed multipart body: {exc}", code="invalid_multipart") from exc
        raise
    return collector.form


def _discard(collector: _Collector) -> None:
    if collector.form.upload is not None:
        collector.form.upload.discard()
