"""Run the vLLM serving command line the operator renders, and drive it with the official openai client.

The operator's vLLM Deployment has been checked on the API server (it is
accepted and well formed); this script checks that the command inside it
works. It builds the same Deployment with `builders.serving_deployment` for a
LoRA job saved unmerged (`method.lora.merge: false`, so vLLM serves the base
and the adapter through `--enable-lora --lora-modules`, with `VLLM_API_KEY`
from the job's key), takes the container's arguments unchanged except the
port, starts `python -m vllm.entrypoints.openai.api_server` (the entrypoint of
the vllm/vllm-openai image) with them on a small local model, and checks with
the `openai` client: the models list (base and adapter), a completion, a chat
completion, a streamed chat completion equal to the non-streamed one, a
completion through the adapter, and 401 without the key. A second job that
shares the first one's serving (`spec.serving.shareWith`) is rendered in as one
more `--lora-modules` entry, as the operator does for a vLLM host, and answers
by its own name.

Without a CUDA GPU or without the `vllm` package it prints one line saying
so and exits 0, claiming nothing.

    python bench/serve_vllm_check.py                  # tiny Llama made on the fly + a random LoRA
    python bench/serve_vllm_check.py --model DIR      # a real small model folder (Llama-like)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.operator.jobs import builders, reconcile, render
from kubetune.operator.settings import OperatorSettings

JOB_NAME = "vllm-check"
GUEST_NAME = "vllm-check-shared"
"""A second LoRA job of the same base with `spec.serving.shareWith: vllm-check`."""


def why_not_run() -> str | None:
    """None when a CUDA GPU and vllm are here; else the reason the check cannot run."""
    try:
        import torch
    except ImportError:
        return "no torch"
    reasons = []
    if not torch.cuda.is_available():
        reasons.append("no GPU")
    if importlib.util.find_spec("vllm") is None:
        reasons.append("no vllm")
    return " / ".join(reasons) or None


def check_job(base: Path, output_root: Path, name: str = JOB_NAME, **serving: Any) -> dict[str, Any]:
    """A FineTuneJob serving an unmerged LoRA adapter with vLLM, with local paths as sources."""
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "default", "uid": f"check-{name}"},
        "spec": {"model": {"source": str(base)}, "output": {"storage": str(output_root)},
                 "dataset": {"format": "text", "train": {"source": "/unused"}},
                 "method": {"type": "lora", "lora": {"rank": 8, "merge": False}},
                 "serving": {"enabled": True, "runtime": "vllm", "resources": {"gpus": 1}, **serving}},
        "status": {"conditions": [{"type": "Succeeded", "status": "True"}]},
    }


def shared_guests(job: dict[str, Any]) -> list[tuple[str, str]]:
    """The guests the operator would give the job's vLLM Deployment: the sharing job's adapter."""
    spec = job["spec"]
    guest = check_job(Path(spec["model"]["source"]), Path(spec["output"]["storage"]), GUEST_NAME, shareWith=JOB_NAME)
    return reconcile.serving_guests(job, (guest,))


def deployment_command(job: dict[str, Any], port: int) -> tuple[list[str], str]:
    """(arguments, API-key variable) of the rendered vLLM container, with `port` instead of the pod's."""
    deployment = builders.serving_deployment(job, FineTuneJobSpec.from_dict(job["spec"]), render.model_location(job),
                                             "sha256:check", OperatorSettings(), guests=shared_guests(job))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = list(container["args"])
    args[args.index("--port") + 1] = str(port)
    args[args.index("--host") + 1] = "127.0.0.1"
    key_vars = [e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    return args, key_vars[0]


def make_models(workdir: Path, base: Path | None) -> Path:
    """The base model (a tiny Llama unless given) and a random LoRA adapter where the trainer would put it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if base is None:
        from kubetune.dev.tinymodel import create_tiny_model

        base = create_tiny_model(workdir / "base", arch="llama")
    for seed, name in enumerate((JOB_NAME, GUEST_NAME)):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        model.peft_config["default"].base_model_name_or_path = str(base)
        model.save_pretrained(workdir / "out" / name / "adapter")
    return base


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM exited with {process.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"vLLM not healthy within {timeout}s")


def drive(url: str, key: str, base_name: str) -> dict[str, Any]:
    """The checks with the official client; raises AssertionError on the first failure."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
    ids = sorted(m.id for m in client.models.list())
    assert ids == sorted([base_name, JOB_NAME, GUEST_NAME]), ids
    completion = client.completions.create(model=base_name, prompt="The operator", max_tokens=8, temperature=0)
    assert completion.usage is not None and completion.usage.completion_tokens >= 1
    messages = [{"role": "user", "content": "What does the operator do?"}]
    chat = client.chat.completions.create(model=JOB_NAME, messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=JOB_NAME, messages=messages, max_tokens=8, temperature=0, stream=True) if chunk.choices)  # type: ignore[arg-type]
    assert text == chat.choices[0].message.content, (text, chat.choices[0].message.content)
    through_adapter = client.completions.create(model=JOB_NAME, prompt="The operator", max_tokens=8, temperature=0)
    shared = client.completions.create(model=GUEST_NAME, prompt="The operator", max_tokens=8, temperature=0)
    assert shared.model == GUEST_NAME and shared.usage is not None and shared.usage.completion_tokens >= 1
    try:
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError:
        pass
    return {"base": completion.choices[0].text, "adapter": through_adapter.choices[0].text,
            "sharedAdapter": shared.choices[0].text,
            "chat": chat.choices[0].message.content, "streamEqualsChat": True, "wrongKey": 401}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a small local model folder (default: a tiny Llama)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds vLLM may take to become healthy")
    parser.add_argument("--plan-only", action="store_true",
                        help="make the models and the Deployment's command line, print it, start nothing (CPU)")
    args = parser.parse_args()
    if args.plan_only:
        with tempfile.TemporaryDirectory() as tmp:
            job = check_job(make_models(Path(tmp), args.model), Path(tmp) / "out")
            vllm_args, key_var = deployment_command(job, free_port())
        print("serve_vllm_check: plan only; the Deployment's command: vllm.entrypoints.openai.api_server",
              " ".join(vllm_args), f"(API key from {key_var})")
        print("RESULT " + json.dumps({"run": False, "planOnly": True, "args": vllm_args, "keyVariable": key_var}))
        return 0
    reason = why_not_run()
    if reason:
        print(f"serve_vllm_check: {reason}: not run (needs a CUDA GPU and the vllm package); no figures claimed")
        print("RESULT " + json.dumps({"run": False, "reason": reason}))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        base = make_models(workdir, args.model)
        job = check_job(base, workdir / "out")
        port = free_port()
        vllm_args, key_var = deployment_command(job, port)
        key = secrets.token_urlsafe(32)
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *vllm_args]
        print("serve_vllm_check: the Deployment's command:", " ".join(command), flush=True)
        log_path = workdir / "vllm.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, key_var: key})
            try:
                url = f"http://127.0.0.1:{port}"
                startup = wait_healthy(url, process, args.timeout)
                base_name = vllm_args[vllm_args.index("--served-model-name") + 1]
                results = drive(url, key, base_name)
            except (AssertionError, RuntimeError) as error:
                print(f"serve_vllm_check: FAILED: {error}\n--- vLLM log (tail) ---\n{log_path.read_text()[-4000:]}")
                print("RESULT " + json.dumps({"run": True, "passed": False, "error": str(error)}))
                return 1
            finally:
                process.terminate()
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
    print(f"serve_vllm_check: passed; vLLM healthy after {startup:.0f}s; answers: {results}")
    print("RESULT " + json.dumps({"run": True, "passed": True, "startupSeconds": startup, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
