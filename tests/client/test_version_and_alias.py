"""`vllm_batch.__version__`, `vllm-batch --version` and openai-batch's spelling `Batch`."""

from __future__ import annotations

from importlib.metadata import version

import pytest

import vllm_batch
import vllm_batch_server
from vllm_batch._cli import main


def test_both_packages_report_the_installed_version() -> None:
    assert vllm_batch.__version__ == vllm_batch_server.__version__ == version("vllm-batch")


def test_the_cli_answers_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.split() == ["vllm-batch", vllm_batch.__version__]


def test_batch_is_openai_batch_spelling_of_vllmbatch() -> None:
    from vllm_batch import Batch

    assert Batch is vllm_batch.VLLMBatch and "Batch" in vllm_batch.__all__ and "__version__" in vllm_batch.__all__
