"""vllm_batch: a client for OpenAI-compatible Batch APIs — our server, OpenAI, Parasail, or any other.

from vllm_batch import VLLMBatch

with VLLMBatch() as batch:
    batch.add_to_batch(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hello"}])
    status, output_path, error_path = batch.submit_wait_download()
    for result in batch.results():
        print(result.custom_id, result.text or result.error)

What it returns, one rule for both clients and every backend: an object OpenAI's Batch API defines is the
openai SDK's type, unchanged (a server batch is `openai.types.Batch`: `list_batches()`, `retries()`,
`BatchStatus.batches`; `BatchResult.parsed()` gives `ChatCompletion` and the like). What the client puts
together, or only the vllm-batch server has, is one of its own frozen dataclasses (`BatchStatus`,
`RequestCounts`, `BatchResult`, `ResultError`, `Comparison`, `Mark`). JSON it only carries through stays a
`dict` (request and response bodies, metadata, a failed batch's reasons). Errors are always ours
(`VLLMBatchError`), never the SDK's.
"""

from vllm_batch._async import AsyncVLLMBatch
from vllm_batch._curation import Mark
from vllm_batch._errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BatchFailedError,
    BatchStateError,
    BatchTimeoutError,
    BatchValidationError,
    ConfigurationError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    VLLMBatchError,
)
from vllm_batch._export import FORMATS as EXPORT_FORMATS
from vllm_batch._export import ExportError
from vllm_batch._followup import UnsupportedError
from vllm_batch._labelstudio import LabelStudioError, label_studio_config
from vllm_batch._providers import PRESETS, Provider
from vllm_batch._results import BatchResult, Comparison, ResultError
from vllm_batch._retry import RetryPolicy
from vllm_batch._status import BatchStatus, RequestCounts
from vllm_batch._sync import VLLMBatch
from vllm_batch._version import __version__

# openai-batch's spelling (`from openai_batch import Batch`): the same class, for code that moves over
# (docs/client.md, "Coming from openai-batch").
Batch = VLLMBatch

__all__ = [
    "EXPORT_FORMATS",
    "PRESETS",
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncVLLMBatch",
    "AuthenticationError",
    "BadRequestError",
    "Batch",
    "BatchFailedError",
    "BatchResult",
    "BatchStateError",
    "BatchStatus",
    "BatchTimeoutError",
    "BatchValidationError",
    "Comparison",
    "ConfigurationError",
    "ConflictError",
    "ExportError",
    "InternalServerError",
    "LabelStudioError",
    "Mark",
    "NotFoundError",
    "PermissionDeniedError",
    "Provider",
    "RateLimitError",
    "RequestCounts",
    "ResultError",
    "RetryPolicy",
    "UnsupportedError",
    "VLLMBatch",
    "VLLMBatchError",
    "__version__",
    "label_studio_config",
]
