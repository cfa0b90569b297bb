"""bench/serve_vllm_check.py starts exactly the command the operator's vLLM Deployment runs.

The check itself needs a CUDA GPU and vllm (the GPU suite runs it); here: the
command it would start is the rendered container's, only the port and host
changed (a job sharing its serving, `shareWith`, rendered in as one more `--lora-modules`
entry), and without a GPU or vllm it says so and exits 0 claiming nothing.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[3]


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serve_vllm_check", REPO / "bench" / "serve_vllm_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_command_is_the_deployments_with_only_host_and_port_changed(tmp_path: Path) -> None:
    script = load_script()
    job = script.check_job(tmp_path / "base", tmp_path / "out")
    args, key_variable = script.deployment_command(job, 12345)
    adapter, shared = f"{tmp_path}/out/vllm-check/adapter", f"{tmp_path}/out/vllm-check-shared/adapter"
    assert args == ["--model", str(tmp_path / "base"), "--served-model-name", "vllm-check-base", "--enable-lora",
                    "--lora-modules", f"vllm-check={adapter}", f"vllm-check-shared={shared}", "--max-lora-rank", "8",
                    "--host", "127.0.0.1", "--port", "12345"]
    assert key_variable == "VLLM_API_KEY"


def test_without_a_gpu_or_vllm_it_says_so_and_exits_0() -> None:
    script = load_script()
    reason = script.why_not_run()
    if reason is None:
        pytest.skip("a CUDA GPU and vllm are here: the GPU suite runs the real check (bench/gpu_suite.sh)")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "serve_vllm_check.py")], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"serve_vllm_check: {reason}: not run" in proc.stdout
    assert 'RESULT {"run": false' in proc.stdout
