"""GET /openapi.json: an OpenAPI 3.1 description of this server's API.

For people and tools (code generators, API explorers), and for our own schema-driven fuzzing
(tests/hostile/test_schema_fuzz.py), which also checks that every route the app serves is described here and
that real answers match these schemas. Kept by hand, next to the routes, so it says what the server does
rather than what a framework infers.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vllm_batch_server.api.batches import MAX_METADATA_PAIRS, MAX_METADATA_VALUE
from vllm_batch_server.api.events import MAX_LIMIT, MAX_SEQ
from vllm_batch_server.api.files import UPLOAD_PURPOSES
from vllm_batch_server.api.params import MAX_EXPIRY, MIN_EXPIRY
from vllm_batch_server.api.ui import MEDIA_TYPES
from vllm_batch_server.engines.base import STREAMING_ENDPOINTS, SUPPORTED_ENDPOINTS
from vllm_batch_server.queue.priority import BATCH_BASE
from vllm_batch_server.results.marks import MAX_LABEL, MAX_NOTE
from vllm_batch_server.statuses import EVENT_TYPES


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    texts = {400: "Invalid request", 401: "Missing or wrong API key", 404: "No such object", 409: "Conflict",
             408: "The body stalled (nothing for --body-idle-timeout seconds)", 413: "Body too large",
             429: "Too many online requests at once (see Retry-After)",
             503: "Try again in a moment (see Retry-After)", 507: "Out of disk space"}
    return {str(status): _json(_ref("Error"), texts[status]) for status in statuses}


def _online(url: str) -> dict[str, Any]:
    """An online endpoint: the body is the engine's (vLLM's serving classes: as `vllm serve` answers)."""
    properties: dict[str, Any] = {
        "model": {"type": "string", "description": "must be the loaded model"},
        "priority": {"type": "integer", "maximum": BATCH_BASE - 1,
                     "description": "vLLM's extension: lower runs first; online requests always run ahead of "
                     "batch work"},
    }
    answers: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if url in STREAMING_ENDPOINTS:
        properties["stream"] = {"type": ["boolean", "null"]}
        answers["text/event-stream"] = {"schema": {"type": "string"}}
    errors = _errors(400, 401, 404, 429, 503)
    # Errors the engine itself answers come in vLLM's form, whose `code` is the HTTP status as a number.
    errors["400"] = _json(_ref("OnlineError"), "Invalid request, or the model is not the loaded one")
    name = url.removeprefix("/v1/").replace("/", "_")
    return {"post": {
        "operationId": f"online_{name}",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["model"], "properties": properties}}}},
        "responses": {"200": {"description": "The engine's answer", "content": answers}, **errors},
    }}


_NULLABLE_INT = {"type": ["integer", "null"]}
_NULLABLE_STR = {"type": ["string", "null"]}
_FILE_ID = {"type": "string", "pattern": "^file-[A-Za-z0-9]{1,64}$"}
_BATCH_ID = {"type": "string", "pattern": "^batch_[A-Za-z0-9]{1,64}$"}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "param": _NULLABLE_STR,
                           "code": _NULLABLE_STR},
        }},
    },
    "OnlineError": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "param": _NULLABLE_STR,
                           "code": {"type": ["string", "integer", "null"]}},
        }},
    },
    "File": {
        "type": "object",
        "required": ["id", "object", "bytes", "created_at", "filename", "purpose"],
        "properties": {
            "id": {"type": "string"}, "object": {"const": "file"}, "bytes": {"type": "integer"},
            "created_at": {"type": "integer"}, "expires_at": _NULLABLE_INT, "filename": {"type": "string"},
            "purpose": {"type": "string"}, "status": {"type": "string"}, "status_details": _NULLABLE_STR,
        },
    },
    "FileList": {
        "type": "object",
        "required": ["object", "data", "has_more"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("File")},
                       "first_id": _NULLABLE_STR, "last_id": _NULLABLE_STR, "has_more": {"type": "boolean"}},
    },
    "FileDeleted": {
        "type": "object",
        "required": ["id", "object", "deleted"],
        "properties": {"id": {"type": "string"}, "object": {"const": "file"}, "deleted": {"type": "boolean"}},
    },
    "Batch": {
        "type": "object",
        "required": ["id", "object", "endpoint", "input_file_id", "completion_window", "status", "created_at",
                     "request_counts"],
        "properties": {
            "id": {"type": "string"}, "object": {"const": "batch"}, "endpoint": {"type": "string"},
            "model": _NULLABLE_STR,
            "errors": {"oneOf": [{"type": "null"}, {
                "type": "object",
                "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
                    "type": "object",
                    "properties": {"code": _NULLABLE_STR, "line": _NULLABLE_INT, "message": _NULLABLE_STR,
                                   "param": _NULLABLE_STR}}}}}]},
            "input_file_id": {"type": "string"}, "completion_window": {"type": "string"},
            "status": {"enum": ["validating", "failed", "in_progress", "finalizing", "completed", "expired",
                                "cancelling", "cancelled"]},
            "output_file_id": _NULLABLE_STR, "error_file_id": _NULLABLE_STR, "created_at": {"type": "integer"},
            **{name: _NULLABLE_INT for name in (
                "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
                "cancelling_at", "cancelled_at")},
            "request_counts": {"type": "object", "required": ["total", "completed", "failed"], "properties": {
                "total": {"type": "integer"}, "completed": {"type": "integer"}, "failed": {"type": "integer"}}},
            "usage": {"type": "object"},
            "metadata": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
        },
    },
    "BatchList": {
        "type": "object",
        "required": ["object", "data", "has_more"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Batch")},
                       "first_id": _NULLABLE_STR, "last_id": _NULLABLE_STR, "has_more": {"type": "boolean"}},
    },
    "CreateBatch": {
        "type": "object",
        "required": ["input_file_id", "endpoint", "completion_window"],
        "additionalProperties": False,
        "properties": {
            "input_file_id": _FILE_ID,
            "endpoint": {"enum": list(SUPPORTED_ENDPOINTS)},
            "completion_window": {"type": "string", "description": "'24h', or a duration such as '90m', '2h' "
                                  "or '30s' (at most 30 days)", "pattern": "^[1-9][0-9]{0,6}[smhd]$"},
            "metadata": {"type": ["object", "null"], "maxProperties": MAX_METADATA_PAIRS,
                         "propertyNames": {"maxLength": 64},
                         "additionalProperties": {"type": "string", "maxLength": MAX_METADATA_VALUE}},
            "output_expires_after": {
                "type": ["object", "null"], "required": ["anchor", "seconds"],
                "properties": {"anchor": {"const": "created_at"},
                               "seconds": {"type": "integer", "minimum": MIN_EXPIRY, "maximum": MAX_EXPIRY}}},
        },
    },
    "RetryOptions": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "completion_window": {"type": "string", "pattern": "^[1-9][0-9]{0,6}[smhd]$"},
            "metadata": {"type": ["object", "null"], "maxProperties": MAX_METADATA_PAIRS - 1,
                         "propertyNames": {"maxLength": 64, "not": {"const": "retry_of"}},
                         "additionalProperties": {"type": "string", "maxLength": MAX_METADATA_VALUE}},
        },
    },
    "RetryBatches": {
        "type": "object",
        "required": ["batch_ids"],
        "additionalProperties": False,
        "properties": {
            "batch_ids": {"type": "array", "minItems": 1, "maxItems": 16, "uniqueItems": True, "items": _BATCH_ID},
            "completion_window": {"type": "string", "pattern": "^[1-9][0-9]{0,6}[smhd]$"},
            "metadata": {"type": ["object", "null"], "maxProperties": MAX_METADATA_PAIRS - 1,
                         "propertyNames": {"maxLength": 64, "not": {"const": "retry_of"}},
                         "additionalProperties": {"type": "string", "maxLength": MAX_METADATA_VALUE}},
        },
    },
    "MarkInput": {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": {
            "label": {"type": ["string", "null"], "minLength": 1, "maxLength": MAX_LABEL},
            "score": {"type": ["number", "null"]},
            "note": {"type": ["string", "null"], "maxLength": MAX_NOTE},
        },
    },
    "Mark": {
        "type": "object",
        "required": ["object", "batch_id", "custom_id", "label", "score", "note", "updated_at"],
        "properties": {"object": {"const": "batch.mark"}, "batch_id": {"type": "string"},
                       "custom_id": {"type": "string"}, "label": _NULLABLE_STR,
                       "score": {"type": ["number", "null"]}, "note": _NULLABLE_STR,
                       "updated_at": {"type": "integer"}},
    },
    "MarkDeleted": {
        "type": "object",
        "required": ["object", "batch_id", "custom_id", "deleted"],
        "properties": {"object": {"const": "batch.mark"}, "batch_id": {"type": "string"},
                       "custom_id": {"type": "string"}, "deleted": {"type": "boolean"}},
    },
    "MarkList": {
        "type": "object",
        "required": ["object", "data", "has_more"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Mark")},
                       "first_id": _NULLABLE_STR, "last_id": _NULLABLE_STR, "has_more": {"type": "boolean"}},
    },
    "HandlerRunList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
            "type": "object",
            "required": ["name", "status", "attempts", "last_error", "updated_at"],
            "properties": {"name": {"type": "string"},
                           "status": {"enum": ["pending", "succeeded", "failed", "retrying"]},
                           "attempts": {"type": "integer"}, "last_error": _NULLABLE_STR,
                           "updated_at": {"type": "integer"}}}}},
    },
    "Event": {
        "type": "object",
        "required": ["object", "id", "seq", "type", "created_at", "data"],
        "properties": {
            "object": {"const": "event"}, "id": {"type": "string"}, "seq": {"type": "integer"},
            "type": {"enum": list(EVENT_TYPES)}, "created_at": {"type": "integer"},
            "data": {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}},
        },
    },
    "EventList": {
        "type": "object",
        "required": ["object", "data", "has_more"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Event")},
                       "first_id": _NULLABLE_STR, "last_id": _NULLABLE_STR, "has_more": {"type": "boolean"}},
    },
    "WebhookDelivery": {
        "type": "object",
        "required": ["object", "id", "event_id", "event_type", "url", "source", "status", "attempts", "created_at"],
        "properties": {
            "object": {"const": "batch.webhook_delivery"}, "id": {"type": "string"},
            "event_id": {"type": "string"}, "event_type": {"type": "string"}, "url": {"type": "string"},
            "source": {"enum": ["settings", "metadata"]},
            "status": {"enum": ["pending", "delivered", "failed"]}, "attempts": {"type": "integer"},
            "created_at": {"type": "integer"}, "last_attempt_at": _NULLABLE_INT, "last_status_code": _NULLABLE_INT,
            "last_error": _NULLABLE_STR, "next_attempt_at": _NULLABLE_INT, "delivered_at": _NULLABLE_INT,
        },
    },
    "WebhookDeliveryList": {
        "type": "object",
        "required": ["object", "data", "has_more"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("WebhookDelivery")},
                       "first_id": _NULLABLE_STR, "last_id": _NULLABLE_STR, "has_more": {"type": "boolean"}},
    },
    "Readiness": {
        "type": "object",
        "required": ["ready", "reasons"],
        "properties": {"ready": {"type": "boolean"}, "reasons": {"type": "array", "items": {"type": "string"}}},
    },
    "ServerStatus": {
        "type": "object",
        "required": ["object", "version", "engine", "queue", "throughput", "disk"],
        "properties": {
            "object": {"const": "server.status"}, "version": {"type": "string"},
            "engine": {"type": "object", "required": ["kind", "state", "model", "kv_cache_usage"], "properties": {
                "kind": {"type": "string"}, "state": {"enum": ["idle", "loading", "ready", "failed", "asleep"]},
                "model": _NULLABLE_STR, "kv_cache_usage": {"type": ["number", "null"]},
                "max_loaded_models": {"type": "integer"},
                "loaded_models": {
                    "type": "array", "description": "every model an engine holds, least recently used first",
                    "items": {"type": "object", "required": ["model", "state", "running", "kv_cache_usage"],
                              "properties": {
                                  "model": {"type": "string"},
                                  "state": {"enum": ["loading", "ready", "failed", "asleep"]},
                                  "running": {"type": "array", "items": {"type": "string"}},
                                  "kv_cache_usage": {"type": ["number", "null"]},
                                  "cpu_cores": {"type": ["string", "null"], "description":
                                                "the CPU cores its engine computes on, when the server split them "
                                                "between resident models (VLLM_CPU_OMP_THREADS_BIND's form)"}}}}}},
            "queue": {"type": "object", "required": ["validating", "in_progress", "paused"], "properties": {
                "validating": {"type": "integer"}, "in_progress": {"type": "integer"},
                "paused": {"type": "array", "items": {"type": "object", "required": ["id", "reason"], "properties": {
                    "id": {"type": "string"}, "reason": {"type": "string"}}}}}},
            "throughput": {"type": "object", "required": ["requests_per_second", "output_tokens_per_second"],
                           "properties": {"requests_per_second": {"type": "number"},
                                          "output_tokens_per_second": {"type": "number"}}},
            "disk": {"type": "object", "required": ["free_bytes", "total_bytes"], "properties": {
                "free_bytes": {"type": "integer"}, "total_bytes": {"type": "integer"}}},
            "checkpoint": {"type": "object", "properties": {"lag_seconds": {"type": "number"},
                                                            "uncommitted_results": {"type": "integer"}}},
            "running": {"type": "array", "items": {"type": "string"},
                        "description": "the batches the engine runs now; an in_progress batch not among them "
                                       "waits behind them"},
        },
    },
    "Model": {
        "type": "object",
        "required": ["id", "object"],
        "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                       "owned_by": {"type": "string"}},
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}},
    },
}


def _path_param(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _committed_lines(operation: str, kind: str, batch_id: dict[str, Any]) -> dict[str, Any]:
    return {"get": {
        "operationId": operation,
        "description": f"The batch's committed {kind} lines, while it runs and after it ended. The header x-next-line "
        "says where to continue; x-batch-status is the batch's status when the lines were read.",
        "parameters": [batch_id, _query("after_line", {"type": "integer", "minimum": 0, "maximum": 10**12}),
                       _query("limit", {"type": "integer", "minimum": 1, "maximum": 100_000})],
        "responses": {"200": {"description": "JSONL lines", "headers": {
            "x-next-line": {"schema": {"type": "integer"}}, "x-batch-status": {"schema": {"type": "string"}}},
            "content": {"application/jsonl": {"schema": {"type": "string"}}}},
            **_errors(400, 401, 404, 503)}}}


def spec() -> dict[str, Any]:
    file_id = _path_param("file_id", _FILE_ID)
    batch_id = _path_param("batch_id", _BATCH_ID)
    custom_id = _path_param("custom_id", {"type": "string", "minLength": 1, "maxLength": 4096})
    return {
        "openapi": "3.1.0",
        "info": {"title": "vllm-batch server", "version": "1",
                 "description": "OpenAI-compatible Files and Batches API, run durably on vLLM."},
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/files": {
                "post": {
                    "operationId": "createFile",
                    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                        "type": "object",
                        "required": ["file", "purpose"],
                        "properties": {
                            "file": {"type": "string", "contentMediaType": "application/octet-stream"},
                            "purpose": {"enum": list(UPLOAD_PURPOSES)},
                            "expires_after[anchor]": {"const": "created_at"},
                            "expires_after[seconds]": {"type": "integer", "minimum": MIN_EXPIRY,
                                                       "maximum": MAX_EXPIRY},
                        }}}}},
                    "responses": {"200": _json(_ref("File"), "The stored file"),
                                  **_errors(400, 401, 408, 413, 507)},
                },
                "get": {
                    "operationId": "listFiles",
                    "parameters": [_query("after", {"type": "string"}),
                                   _query("limit", {"type": "integer", "minimum": 1, "maximum": 10_000}),
                                   _query("order", {"enum": ["asc", "desc"]}),
                                   _query("purpose", {"type": "string"})],
                    "responses": {"200": _json(_ref("FileList"), "A page of files"), **_errors(400, 401)},
                },
            },
            "/v1/files/{file_id}": {
                "get": {"operationId": "retrieveFile", "parameters": [file_id],
                        "responses": {"200": _json(_ref("File"), "The file"), **_errors(401, 404)}},
                "delete": {"operationId": "deleteFile", "parameters": [file_id],
                           "responses": {"200": _json(_ref("FileDeleted"), "Deleted"), **_errors(401, 404, 409)}},
            },
            "/v1/files/{file_id}/content": {
                "get": {"operationId": "retrieveFileContent", "parameters": [file_id],
                        "responses": {"200": {"description": "The file's bytes", "content": {
                            "application/octet-stream": {"schema": {"type": "string"}}}},
                            **_errors(401, 404)}},
            },
            "/v1/batches": {
                "post": {
                    "operationId": "createBatch",
                    "requestBody": {"required": True,
                                    "content": {"application/json": {"schema": _ref("CreateBatch")}}},
                    "responses": {"200": _json(_ref("Batch"), "The new batch"),
                                  **_errors(400, 401, 404, 408, 413, 507)},
                },
                "get": {
                    "operationId": "listBatches",
                    "parameters": [_query("after", {"type": "string"}),
                                   _query("limit", {"type": "integer", "minimum": 1, "maximum": 100}),
                                   _query("status", {"type": "string", "description": "extension: only batches "
                                          "in these statuses (comma-separated)"}),
                                   _query("model", {"type": "string", "description": "extension: only batches "
                                          "of this model"})],
                    "responses": {"200": _json(_ref("BatchList"), "A page of batches, newest first"),
                                  **_errors(400, 401)},
                },
            },
            "/v1/batches/{batch_id}": {
                "get": {"operationId": "retrieveBatch", "parameters": [batch_id],
                        "responses": {"200": _json(_ref("Batch"), "The batch"), **_errors(401, 404)}},
            },
            "/v1/batches/{batch_id}/cancel": {
                "post": {"operationId": "cancelBatch", "parameters": [batch_id],
                         "responses": {"200": _json(_ref("Batch"), "Cancelling or cancelled"),
                                       **_errors(401, 404, 409)}},
            },
            "/v1/batches/retry": {
                "post": {
                    "operationId": "retryBatches",
                    "description": "A new batch of the requests that failed in all of the given ended batches.",
                    "requestBody": {"required": True,
                                    "content": {"application/json": {"schema": _ref("RetryBatches")}}},
                    "responses": {"200": _json(_ref("Batch"), "The new batch"), **_errors(400, 401, 404, 409, 507)},
                },
            },
            "/v1/batches/{batch_id}/retry": {
                "post": {
                    "operationId": "retryBatch",
                    "description": "A new batch of this ended batch's failed requests (metadata.retry_of names it).",
                    "parameters": [batch_id],
                    "requestBody": {"required": False,
                                    "content": {"application/json": {"schema": _ref("RetryOptions")}}},
                    "responses": {"200": _json(_ref("Batch"), "The new batch"), **_errors(400, 401, 404, 409, 507)},
                },
            },
            "/v1/batches/{batch_id}/output": _committed_lines("batchOutput", "output", batch_id),
            "/v1/batches/{batch_id}/errors": _committed_lines("batchErrors", "error", batch_id),
            "/v1/batches/{batch_id}/marks": {
                "get": {"operationId": "listMarks", "parameters": [
                    batch_id, _query("after", {"type": "string"}),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 10_000}),
                    _query("label", {"type": "string"})],
                    "responses": {"200": _json(_ref("MarkList"), "The batch's marks, in input order"),
                                  **_errors(400, 401, 404)}},
            },
            "/v1/batches/{batch_id}/marks/{custom_id}": {
                "put": {"operationId": "setMark", "parameters": [batch_id, custom_id],
                        "requestBody": {"required": True,
                                        "content": {"application/json": {"schema": _ref("MarkInput")}}},
                        "responses": {"200": _json(_ref("Mark"), "The mark"), **_errors(400, 401, 404, 409)}},
                "delete": {"operationId": "deleteMark", "parameters": [batch_id, custom_id],
                           "responses": {"200": _json(_ref("MarkDeleted"), "Deleted"), **_errors(400, 401, 404)}},
            },
            "/v1/batches/{batch_id}/handlers": {
                "get": {"operationId": "batchHandlers", "parameters": [batch_id],
                        "responses": {"200": _json(_ref("HandlerRunList"), "Each result handler's run"),
                                      **_errors(401, 404)}},
            },
            "/v1/batches/{batch_id}/webhooks": {
                "get": {"operationId": "listBatchWebhookDeliveries", "parameters": [batch_id],
                        "responses": {"200": _json(_ref("WebhookDeliveryList"), "The batch's webhook deliveries"),
                                      **_errors(401, 404)}},
            },
            "/v1/models": {
                "get": {"operationId": "listModels",
                        "responses": {"200": _json(_ref("ModelList"), "The served models"), **_errors(401)}},
            },
            "/v1/models/{model}": {
                "get": {"operationId": "retrieveModel",
                        "parameters": [_path_param("model", {"type": "string"})],
                        "responses": {"200": _json(_ref("Model"), "The model"), **_errors(401, 404)}},
            },
            **{url: _online(url) for url in SUPPORTED_ENDPOINTS},
            "/v1/events": {
                "get": {
                    "operationId": "listEvents",
                    "description": "Extension: the lifecycle's event log, oldest first.",
                    "parameters": [_query("after", {"type": "integer", "minimum": 0, "maximum": MAX_SEQ}),
                                   _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
                                   _query("batch_id", _BATCH_ID)],
                    "responses": {"200": _json(_ref("EventList"), "A page of events"), **_errors(400, 401)},
                },
            },
            "/v1/events/stream": {
                "get": {
                    "operationId": "streamEvents",
                    "description": "Extension: server-sent events, one per lifecycle event, `id:` its seq. "
                                   "Resumes after the Last-Event-ID header's seq, else after `after`, else from "
                                   "now. Ends when the server shuts down.",
                    "parameters": [_query("after", {"type": "integer", "minimum": 0, "maximum": MAX_SEQ}),
                                   {"name": "Last-Event-ID", "in": "header", "required": False,
                                    "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"}}],
                    "responses": {"200": {"description": "The event stream", "content": {
                        "text/event-stream": {"schema": {"type": "string"}}}}, **_errors(400, 401)},
                },
            },
            "/": {
                "get": {"operationId": "dashboard", "security": [],
                        "responses": {"200": {"description": "The dashboard (public: it holds no data)",
                                              "content": {"text/html": {"schema": {"type": "string"}}}}}},
            },
            "/ui": {
                "get": {"operationId": "dashboardMoved", "security": [],
                        "responses": {"307": {"description": "Redirects to the dashboard at /ui/ (its relative "
                                                             "links need the trailing slash)",
                                              "headers": {"location": {"schema": {"type": "string"}}}}}},
            },
            "/ui/{asset}": {
                "get": {"operationId": "dashboardFile", "security": [],
                        "parameters": [_path_param("asset", {"type": "string",
                                                             "pattern": "^[A-Za-z0-9_-][A-Za-z0-9_./-]*$"})],
                        "responses": {"200": {"description": "A file of the dashboard", "content": {
                            media_type.split(";")[0]: {"schema": {"type": "string"}}
                            for media_type in sorted(set(MEDIA_TYPES.values()))}},
                            **_errors(404)}},
            },
            "/health": {
                "get": {"operationId": "health", "security": [],
                        "responses": {"200": _json({"type": "object", "properties": {
                            "status": {"type": "string"}, "engine": {"type": "string"},
                            "loaded_model": _NULLABLE_STR,
                            "loaded_models": {"type": "array", "items": {"type": "string"}}}}, "The server is up")}},
            },
            "/ready": {
                "get": {"operationId": "ready", "security": [],
                        "responses": {"200": _json(_ref("Readiness"), "Ready to work"),
                                      "503": _json(_ref("Readiness"), "Not ready, and why")}},
            },
            "/status": {
                "get": {"operationId": "status",
                        "responses": {"200": _json(_ref("ServerStatus"), "The server at a glance"),
                                      **_errors(401)}},
            },
            "/metrics": {
                "get": {"operationId": "metrics",
                        "description": "Prometheus metrics in the text format 0.0.4 (also when OpenMetrics is "
                                       "asked for); open without the API key with --metrics-public.",
                        "responses": {"200": {"description": "The Prometheus exposition", "content": {
                            "text/plain": {"schema": {"type": "string"}}}},
                            **_errors(401)}},
            },
            "/openapi.json": {
                "get": {"operationId": "openapi",
                        "responses": {"200": _json({"type": "object"}, "This description"), **_errors(401)}},
            },
        },
    }


async def openapi(request: Request) -> Response:
    return JSONResponse(spec())


routes = [Route("/openapi.json", openapi, methods=["GET"])]
