"""Operator latency and scale on the real control plane: N FineTuneJobs created at R per second.

Starts etcd + kube-apiserver + kube-controller-manager (`kubetune.dev.controlplane`)
and the operator as a real subprocess (`python -m kubetune.operator`, as in
its pod), then creates `--jobs` FineTuneJobs at `--rate` per second and plays
the kubelet: every validation pod ends at once with exit 0 and a `validated`
summary, every trainer pod with exit 0 and a `succeeded` summary, so each job
runs its whole lifecycle (ConfigMap, Secret, validation Job, trainer Job,
Succeeded) against the real API server and the real Job controller.

Measured:
- latency from the create request to the operator's validation Job and to
  its trainer Job, from watch events stamped on receipt in this process
  (creationTimestamps only have 1 s resolution); the trainer Job latency
  includes the Job controller creating the validation pod, the (instant)
  pod run and the Job controller marking the validation Job complete, so it
  is also split at the moment the validation Job was seen complete;
- the operator's peak resident memory (VmHWM of its process);
- the operator's API requests, counted by the API server itself: an audit
  policy logs only the operator's user (it runs with its own client
  certificate), by verb and resource; per job, and per job per minute
  while nothing changes (which would reveal polling).

The operator's own reactions (a change it must act on -> its write) are
printed over all jobs and per tenth of the run (in creation order), so a
latency that grows with the backlog shows: FineTuneJob created -> validation
Job; validation Job complete -> trainer Job; trainer Job complete ->
Succeeded in status. `--compare REPS` runs the operator with and without
its watch-fed cache (`KUBETUNE_CACHE`), each run a fresh process with its
own control plane, alternating, and prints min/median/max and the ratios;
`--rates 5,10,20,50` runs one pass per creation rate and prints where the
backlog starts to grow. The load average is printed: the machine is shared.

    python bench/operator_scale.py                      # 1000 jobs at 10/s (about 3-4 minutes)
    python bench/operator_scale.py --jobs 100 --quick   # smoke test
    python bench/operator_scale.py --jobs 200 --compare 3
    python bench/operator_scale.py --jobs 200 --rates 5,10,20,50
    python bench/operator_scale.py --finished 5000      # memory with 5000 finished jobs present

`--finished N` first stores N FineTuneJobs that have already Succeeded (created,
then their status written, before the operator starts): the operator lists,
watches and resumes them all, and its resident memory is printed once it has
(its informers hold every job; kopf delivers each one once), then the N in-flight
jobs run as usual on top of them.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
OPERATOR_USER = "kubetune-operator-bench"
NAMESPACE = "kubetune-bench"
AUDIT_POLICY = f"""apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    users: ["{OPERATOR_USER}"]
  - level: None
"""


CONTROLLER_MANAGER_QPS = 200
"""kube-controller-manager's client requests per second (its default, 20, is what bounds it otherwise)."""
CONTROLLER_MANAGER_BURST = 400


def _controlplane_class() -> Any:
    from kubetune.dev import controlplane

    class AuditedControlPlane(controlplane.ControlPlane):  # type: ignore[misc]
        """The dev control plane, with an audit log of the operator's requests only."""

        profiling = False
        """Whether the API server serves /debug/pprof (`--apiserver-profile`)."""

        @property
        def audit_log(self) -> Path:
            return Path(self.workdir) / "audit.log"

        def _spawn(self, name: str, args: list[str]) -> Any:
            if name == "kube-controller-manager":
                # Its client defaults (20 requests/s, burst 30) and 5 Job workers throttle the Job
                # controller well below 10 jobs/s with a validation and a trainer Job each: the bench
                # would measure the controller-manager's rate limiter, not the operator.
                args = [*args, f"--kube-api-qps={CONTROLLER_MANAGER_QPS}",
                        f"--kube-api-burst={CONTROLLER_MANAGER_BURST}", "--concurrent-job-syncs=20"]
            if name == "kube-apiserver":
                if self.profiling:
                    args = [a for a in args if a != "--profiling=false"] + ["--profiling=true"]
                policy = Path(self.workdir) / "audit-policy.yaml"
                policy.write_text(AUDIT_POLICY)
                args = [*args, f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}",
                        "--audit-log-format=json", "--audit-log-maxsize=0"]
            return super()._spawn(name, args)

    return AuditedControlPlane


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def finetunejob(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {
            "model": {"source": "pvc://models/base/tiny-gpt2"},
            "dataset": {"format": "text", "train": {"source": "pvc://data/train.jsonl"}},
            "output": {"storage": "pvc://models/finetunes"},
            "resources": {"gpus": 1, "cpu": "1", "memory": "2Gi"},
        },
    }


def _now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Observer:
    """Watches Jobs, pods and FineTuneJobs; stamps events on receipt; plays the kubelet for pods."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        import kubernetes

        self.namespace = namespace
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.batch = kubernetes.client.BatchV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.created: dict[str, float] = {}
        """FineTuneJob name -> monotonic time the create request was sent."""
        self.validation_job: dict[str, float] = {}
        self.validation_complete: dict[str, float] = {}
        self.trainer_job: dict[str, float] = {}
        self.trainer_complete: dict[str, float] = {}
        self.validation_pod_ended: dict[str, float] = {}
        """FineTuneJob name -> when this kubelet's patch ending its validation pod returned: the operator
        reacts to the pod's end (its summary), usually before the Job controller marks the Job complete."""
        self.succeeded: dict[str, float] = {}
        self.kubelet_patches = 0
        self._pods_done: set[str] = set()
        self._stop = threading.Event()
        self._kubelet = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="kubelet")
        self._threads = [threading.Thread(target=self._loop, args=(watch,), daemon=True)
                         for watch in (self._watch_jobs, self._watch_pods, self._watch_finetunejobs)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._kubelet.shutdown(wait=False, cancel_futures=True)

    def _loop(self, watch: Any) -> None:
        while not self._stop.is_set():
            try:
                watch()
            except Exception as error:  # noqa: BLE001 - a dropped watch is restarted
                if not self._stop.is_set():
                    print(f"watch restarted after {type(error).__name__}: {error}", file=sys.stderr)
                    time.sleep(0.2)

    def _stream(self, list_call: Any, *args: Any) -> Any:
        import kubernetes

        return kubernetes.watch.Watch().stream(list_call, *args, timeout_seconds=3600, _request_timeout=3700)

    def _watch_jobs(self) -> None:
        for event in self._stream(self.batch.list_namespaced_job, self.namespace):
            received = time.monotonic()
            job = event["object"]
            name = job.metadata.name
            if name.endswith("-validate"):
                owner = name[: -len("-validate")]
                self.validation_job.setdefault(owner, received)
                if any(c.type == "Complete" and c.status == "True" for c in (job.status.conditions or [])):
                    self.validation_complete.setdefault(owner, received)
            elif name.endswith("-train"):
                owner = name[: -len("-train")]
                self.trainer_job.setdefault(owner, received)
                if any(c.type == "Complete" and c.status == "True" for c in (job.status.conditions or [])):
                    self.trainer_complete.setdefault(owner, received)

    def _watch_pods(self) -> None:
        for event in self._stream(self.core.list_namespaced_pod, self.namespace):
            pod = event["object"]
            job_name = (pod.metadata.labels or {}).get("batch.kubernetes.io/job-name", "")
            if event["type"] == "DELETED" or pod.metadata.name in self._pods_done or not job_name:
                continue
            if (pod.status.phase or "Pending") != "Pending":
                continue
            self._pods_done.add(pod.metadata.name)
            if job_name.endswith("-validate"):
                summary = {"outcome": "validated", "message": "120 train / 15 validation / 15 test examples"}
            else:
                summary = {"outcome": "succeeded", "step": 10, "valLoss": 1.5, "results": {"perplexity": 4.5},
                           "modelDigest": "sha256:" + "0" * 64, "message": "trained 10 steps"}
            self._kubelet.submit(self._finish_pod, pod.metadata.name, pod.spec.containers[0], json.dumps(summary),
                                 job_name[: -len("-validate")] if job_name.endswith("-validate") else "")

    def _finish_pod(self, pod_name: str, container: Any, message: str, validating: str = "") -> None:
        now = _now_rfc3339()
        status = {"status": {
            "phase": "Succeeded", "startTime": now,
            "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": now}],
            "containerStatuses": [{"name": container.name, "image": container.image, "imageID": "",
                                   "ready": False, "restartCount": 0, "started": False,
                                   "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": message,
                                                            "startedAt": now, "finishedAt": now}}}]}}
        try:
            self.core.patch_namespaced_pod_status(pod_name, self.namespace, status)
            if validating:
                self.validation_pod_ended.setdefault(validating, time.monotonic())
            self.kubelet_patches += 1
        except Exception as error:  # noqa: BLE001 - reported, the job then never finishes and shows in the counts
            print(f"kubelet patch of {pod_name} failed: {error}", file=sys.stderr)

    def _watch_finetunejobs(self) -> None:
        for event in self._stream(self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL):
            received = time.monotonic()
            body = event["object"]
            found = (body.get("status") or {}).get("conditions") or []
            if any(c.get("type") == "Succeeded" and c.get("status") == "True" for c in found):
                self.succeeded.setdefault(body["metadata"]["name"], received)


def quantile(values: list[float], missing: int, q: float) -> float | None:
    """The q-quantile over every job, the `missing` ones (never reached) counted as infinitely late:
    None when the quantile falls on a job that never got there. Leaving them out would report the
    latency of the jobs that were lucky enough to be handled, not the operator's."""
    ordered = sorted(values) + [float("inf")] * missing
    if not ordered:
        return None
    value = ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
    return None if value == float("inf") else value


def percentiles(values: list[float], total: int) -> str:
    """p50/p99/max over all `total` jobs; those without a measurement are 'not reached'."""
    missing = total - len(values)

    def show(q: float) -> str:
        value = quantile(values, missing, q)
        return "not reached" if value is None else f"{value:.3f} s"

    worst = "not reached" if missing else (f"{max(values):.3f} s" if values else "none measured")
    return (f"p50 {show(0.5)}  p99 {show(0.99)}  max {worst}  (over all {total} jobs"
            + (f"; {missing} not reached)" if missing else ")"))


def latencies(start: dict[str, float], end: dict[str, float]) -> list[float]:
    return [end[name] - start[name] for name in start if name in end]


def saturation(created: dict[str, float], reached: dict[str, float], rate: float) -> tuple[bool, float]:
    """(saturated, handled per second): whether the operator kept up with the creation rate. Handled
    rate = jobs that reached their trainer Job per second, from the first create to the last of them."""
    done = [reached[name] for name in created if name in reached]
    if not created:
        return False, 0.0
    span = (max(done) - min(created.values())) if done else float("inf")
    handled = len(done) / span if span > 0 else float("inf")
    return len(done) < len(created) or handled < 0.9 * rate, handled


def by_tenth(created: dict[str, float], start: dict[str, float], end: dict[str, float]) -> list[str]:
    """p50/p99 of end - start for each tenth of the jobs in creation order, over all jobs of that tenth
    (a job without `end` is 'not reached'): a latency that grows with the run shows here."""
    order = sorted(created, key=created.__getitem__)
    size = max(1, -(-len(order) // 10))
    lines = []
    for index in range(0, len(order), size):
        names = order[index:index + size]
        values = [end[n] - start[n] for n in names if n in start and n in end]
        missing = len(names) - len(values)
        p50, p99 = quantile(values, missing, 0.5), quantile(values, missing, 0.99)
        shown = ["not reached" if v is None else f"{v * 1000:.0f} ms" for v in (p50, p99)]
        lines.append(f"    jobs {index + 1:>5}-{index + len(names):<5} p50 {shown[0]:>12}  p99 {shown[1]:>12}"
                     + (f"  ({missing} not reached)" if missing else ""))
    return lines


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} on {os.cpu_count()} CPUs"


def audit_counts(path: Path, since: float, until: float) -> collections.Counter[str]:
    """The operator's requests between two wall-clock times, by 'verb resource[/subresource]'."""
    counts: collections.Counter[str] = collections.Counter()
    if not path.exists():
        return counts
    with path.open() as handle:
        for line in handle:
            entry = json.loads(line)
            if entry.get("stage") not in ("ResponseComplete", "Panic"):
                continue
            stamp = datetime.fromisoformat(entry["stageTimestamp"].replace("Z", "+00:00")).timestamp()
            if not since <= stamp < until:
                continue
            ref = entry.get("objectRef") or {}
            resource = ref.get("resource", entry.get("requestURI", "?"))
            if ref.get("subresource"):
                resource += "/" + ref["subresource"]
            counts[f"{entry['verb']} {resource}"] += 1
    return counts


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_part(plane: Any, operator_pid: int) -> dict[str, float]:
    """CPU seconds so far of the operator, each control-plane process and this bench (the kubelet it plays
    and the creating client): who used the shared cores."""
    parts = {"operator": cpu_seconds(operator_pid), "bench (client + kubelet)": time.process_time()}
    parts |= {name: cpu_seconds(proc.pid) for name, proc in plane._procs.items()}
    return parts


def start_sampler(binary: Path, pid: int, workdir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """py-spy recording the operator's stacks (collapsed format) until `print_samples` stops it."""
    out = workdir / "operator.py-spy.txt"
    proc = subprocess.Popen([str(binary), "record", "--pid", str(pid), "--rate", "50", "--format", "raw",
                             "--output", str(out), "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, out


def print_samples(proc: subprocess.Popen[bytes], out: Path, top: int = 25) -> None:
    """Stop the sampler; print the functions with the most samples, on the stack (total) and on top (self)."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    if not out.exists():
        print("py-spy wrote nothing (ptrace not permitted?)")
        return
    total: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in out.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame.split(" (")[0] + " " + frame.rsplit("/", 1)[-1].split(":")[0].rstrip(")")
                  for frame in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    print(f"py-spy: {samples} samples of the operator's busy threads (50/s; idle threads left out)")
    print("  most on the stack:")
    for frame, count in total.most_common(top):
        print(f"    {count / max(1, samples):6.1%}  {frame}")
    print("  most on top (self):")
    for frame, count in own.most_common(top):
        print(f"    {count / max(1, samples):6.1%}  {frame}")


def start_apiserver_profile(plane: Any, seconds: float, workdir: Path) -> tuple[threading.Thread, Path]:
    """A CPU profile of the API server over the next `seconds` (its /debug/pprof, fetched with kubectl)."""
    out = workdir / "kube-apiserver.pprof"

    def fetch() -> None:
        raw = subprocess.run([plane._binary("kubectl"), f"--kubeconfig={plane.kubeconfig}", "get", "--raw",
                              f"/debug/pprof/profile?seconds={max(1, int(seconds))}"], capture_output=True, check=False)
        out.write_bytes(raw.stdout)

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    return thread, out


def print_apiserver_profile(plane: Any, fetching: threading.Thread, out: Path, top: int = 30) -> None:
    """Where the API server's CPU went (`go tool pprof -top`, flat and cumulative)."""
    fetching.join(timeout=120)
    if not out.exists() or not out.stat().st_size:
        print("API server profile: nothing fetched")
        return
    for order in ("-cum", "-flat"):
        shown = subprocess.run(["go", "tool", "pprof", "-top", order, f"-nodecount={top}",
                                plane._binary("kube-apiserver"), str(out)], capture_output=True, text=True, check=False)
        print(f"API server CPU profile ({order[1:]}):\n" + "\n".join(
            line for line in (shown.stdout or shown.stderr).splitlines() if line.strip()))


def vm_hwm_mib(pid: int) -> tuple[float, float]:
    """(peak, current) resident memory of a process, MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024


def start_operator(plane: Any, kubeconfig: Path, workdir: Path, cache: bool = True
                   ) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "KUBETUNE_NAMESPACES": NAMESPACE,
        "KUBETUNE_HTTP_HOST": "127.0.0.1",
        "KUBETUNE_HTTP_PORT": str(port),
        "KUBETUNE_METRICS_PORT": "0",
        "KUBETUNE_PROGRESS_URL": f"http://127.0.0.1:{port}/v1/reports",
        "KUBETUNE_SECRET_KEY": secrets.token_hex(16),
        "KUBETUNE_TRAINER_IMAGE": "kubetune-trainer:bench",
        "KUBETUNE_PEERING": f"kubetune-bench-{secrets.token_hex(3)}",
        "KUBETUNE_CACHE": "true" if cache else "false",
    }
    log = open(workdir / "operator.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "kubetune.operator"], env=env, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the operator exited with {proc.returncode}; see {workdir / 'operator.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                if response.status == 200:
                    return proc, port
        except OSError:
            time.sleep(0.3)
    proc.kill()  # not left running against a control plane that is about to stop
    proc.wait()
    raise RuntimeError(f"the operator did not answer /healthz within 90 s; see {workdir / 'operator.log'}")


def install_crds(plane: Any) -> None:
    files = sorted((REPO / "crds").glob("*.yaml"))
    for path in files:
        plane.kubectl("apply", "--server-side", "-f", str(path))
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")


def create_jobs(custom: Any, observer: Observer, count: int, rate: float) -> float:
    """Creates `count` FineTuneJobs at `rate` per second; returns how long creating took."""
    started = time.monotonic()
    pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="create")

    def create(name: str) -> None:
        observer.created[name] = time.monotonic()
        custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, finetunejob(name))

    futures = []
    for index in range(count):
        delay = started + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        futures.append(pool.submit(create, f"bench-{index:04d}"))
    for future in futures:
        future.result()
    pool.shutdown()
    return time.monotonic() - started


def create_finished(custom: Any, count: int) -> float:
    """Stores `count` FineTuneJobs that have already Succeeded (before the operator starts, so it never
    sees them unfinished); returns how long that took."""
    started = time.monotonic()
    now = _now_rfc3339()
    status = {"phase": "Succeeded", "observedGeneration": 1, "conditions": [
        {"type": "Succeeded", "status": "True", "reason": "TrainingComplete", "message": "finished before the bench",
         "lastTransitionTime": now},
        {"type": "Validated", "status": "True", "reason": "DatasetValid", "message": "", "lastTransitionTime": now}]}

    def store(name: str) -> None:
        custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, finetunejob(name))
        custom.patch_namespaced_custom_object_status(GROUP, VERSION, NAMESPACE, PLURAL, name, {"status": status})

    with concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="finished") as pool:
        for future in [pool.submit(store, f"done-{index:05d}") for index in range(count)]:
            future.result()
    return time.monotonic() - started


def settled_memory(pid: int, quiet: float = 10.0, timeout: float = 900.0) -> tuple[float, float]:
    """(resident MiB, seconds waited) once the operator's CPU time has stayed flat for `quiet` seconds:
    it has listed and resumed everything there is."""
    started = time.monotonic()

    def cpu_seconds() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    last, flat_since = cpu_seconds(), time.monotonic()
    while time.monotonic() - started < timeout:
        time.sleep(1.0)
        now = cpu_seconds()
        if now - last > 0.05:  # more than 5% of a core in the last second: still working
            last, flat_since = now, time.monotonic()
        elif time.monotonic() - flat_since >= quiet:
            break
        last = now
    return vm_hwm_mib(pid)[1], time.monotonic() - started


def warm_up(observer: Observer) -> None:
    """One job through its whole lifecycle first: the operator's watches are up before the clock starts
    (right after the CRD is installed, the API server answers 429 for a few seconds)."""
    observer.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, finetunejob("warm-up"))
    if not wait_for(lambda: "warm-up" in observer.succeeded, timeout=120):
        raise RuntimeError("the warm-up FineTuneJob did not succeed within 120 s")
    time.sleep(2)


def wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return bool(predicate())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=10.0, help="FineTuneJobs created per second")
    parser.add_argument("--idle", type=float, default=60.0,
                        help="seconds to count requests after every job finished (polling shows here)")
    parser.add_argument("--settle", type=float, default=30.0,
                        help="seconds after the last Succeeded before the idle window (the Job controller's "
                             "last status updates still arrive then)")
    parser.add_argument("--quick", action="store_true", help="20 jobs, short idle window: a smoke test")
    parser.add_argument("--keep", type=Path, help="work directory to keep (logs, audit log)")
    parser.add_argument("--cache", choices=("on", "off"), default="on",
                        help="the operator's watch-fed cache (KUBETUNE_CACHE); off = reads from the API server")
    parser.add_argument("--compare", type=int, metavar="REPS",
                        help="run cache off and on REPS times each (alternating, each its own process)")
    parser.add_argument("--rates", help="comma-separated creation rates: one run each, cache on")
    parser.add_argument("--py-spy", type=Path, metavar="BINARY",
                        help="sample the operator with this py-spy over the lifecycle and print where its CPU went")
    parser.add_argument("--apiserver-profile", action="store_true",
                        help="profile the API server's CPU while the jobs are created and print where it went "
                             "(needs Go's pprof: `go tool pprof`)")
    parser.add_argument("--finished", type=int, default=0, metavar="N",
                        help="store N FineTuneJobs that have already Succeeded before the operator starts")
    args = parser.parse_args()
    if args.compare or args.rates:
        return compare(args)
    if args.quick:
        args.jobs, args.idle, args.settle = min(args.jobs, 20), min(args.idle, 10.0), min(args.settle, 10.0)

    control_plane = _controlplane_class()
    control_plane.profiling = args.apiserver_profile
    with tempfile.TemporaryDirectory(prefix="kubetune-opbench-") as scratch:
        workdir = args.keep or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        plane = control_plane(workdir / "controlplane")
        plane.start()
        operator = None
        try:
            install_crds(plane)
            plane.kubectl("create", "namespace", NAMESPACE)
            plane.kubectl("label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted")
            operator_kubeconfig = plane.mint_kubeconfig(OPERATOR_USER, ("system:masters",))
            client = plane.api_client()
            client.configuration.connection_pool_maxsize = 16
            finished_memory: dict[str, float] = {}
            if args.finished:
                import kubernetes

                storing = create_finished(kubernetes.client.CustomObjectsApi(client), args.finished)
                print(f"stored {args.finished} finished FineTuneJobs in {storing:.1f} s", flush=True)
            operator, _ = start_operator(plane, operator_kubeconfig, workdir, cache=args.cache == "on")
            if args.finished:
                resident, waited = settled_memory(operator.pid)
                finished_memory = {"finishedJobs": args.finished, "residentWithFinishedMiB": round(resident, 1),
                                   "resumedInSeconds": round(waited, 1)}
                print(f"operator memory   {resident:.0f} MiB resident with {args.finished} finished jobs present, "
                      f"once it had resumed them all ({waited:.0f} s after it answered; target < 250 MiB)", flush=True)
            observer = Observer(client, NAMESPACE)
            observer.start()
            warm_up(observer)
            baseline_hwm, baseline_rss = vm_hwm_mib(operator.pid)
            first_wall = time.time()
            cpu_before = cpu_by_part(plane, operator.pid)
            sampler = start_sampler(args.py_spy, operator.pid, workdir) if args.py_spy else None
            profile = start_apiserver_profile(plane, args.jobs / args.rate, workdir) if args.apiserver_profile else None
            print(f"operator started: {baseline_rss:.0f} MiB resident before any job; creating {args.jobs} "
                  f"FineTuneJobs at {args.rate:g}/s", flush=True)
            creating = create_jobs(observer.custom, observer, args.jobs, args.rate)
            print(f"created {args.jobs} in {creating:.1f} s", flush=True)
            finished = wait_for(lambda: sum(n in observer.succeeded for n in observer.created) >= args.jobs, timeout=max(120.0, args.jobs * 0.3))
            lifecycle_end_wall = time.time()
            cpu_used = {part: seconds - cpu_before.get(part, 0.0)
                        for part, seconds in cpu_by_part(plane, operator.pid).items()}
            if sampler is not None:
                print_samples(*sampler)
            if profile is not None:
                print_apiserver_profile(plane, *profile)
            done_at = time.monotonic()
            print(f"{sum(n in observer.succeeded for n in observer.created)}/{args.jobs} Succeeded "
                  f"{done_at - min(observer.created.values()):.1f} s after the first create", flush=True)
            time.sleep(args.settle)
            idle_start_wall = time.time()
            time.sleep(args.idle)
            idle_end_wall = time.time()
            peak, current = vm_hwm_mib(operator.pid)
            time.sleep(2)  # the audit log's last batch
            lifecycle = audit_counts(plane.audit_log, first_wall, lifecycle_end_wall)
            settling = audit_counts(plane.audit_log, lifecycle_end_wall, idle_start_wall)
            idle = audit_counts(plane.audit_log, idle_start_wall, idle_end_wall)
        finally:
            if operator is not None:
                operator.terminate()
                try:
                    operator.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    operator.kill()
            plane.stop()

    observer.stop()
    to_validation = latencies(observer.created, observer.validation_job)
    to_trainer = latencies(observer.created, observer.trainer_job)
    # The operator acts on the validation pod's end (it reads the pod's summary), whichever of that and
    # the Job controller's Complete comes first.
    validated = {name: min(t, observer.validation_complete.get(name, t))
                 for name, t in observer.validation_pod_ended.items() if name in observer.created}
    reaction = latencies(validated, observer.trainer_job)
    finish_reaction = latencies({n: t for n, t in observer.trainer_complete.items() if n in observer.created},
                                observer.succeeded)
    to_succeeded = latencies(observer.created, observer.succeeded)
    lifecycle += settling  # the tail of the lifecycle: the last child updates after Succeeded
    total_requests = sum(lifecycle.values())
    idle_requests = sum(idle.values())
    succeeded = sum(name in observer.succeeded for name in observer.created)
    print(f"jobs              {args.jobs} created at {args.rate:g}/s ({creating:.1f} s); "
          f"{succeeded} reached Succeeded{'' if finished else ' (TIMED OUT waiting for the rest)'}")
    total = len(observer.created)
    saturated, handled = saturation(observer.created, observer.trainer_job, args.rate)
    if saturated:
        print(f"SATURATED         the operator handled {handled:.2f} jobs/s against {args.rate:g}/s created: a backlog "
              f"grew, so the latencies below are queueing time, not reaction time")
    print(f"create -> validation Job   {percentiles(to_validation, total)}")
    print(f"create -> trainer Job      {percentiles(to_trainer, total)}  (target p50 < 0.5 s, p99 < 2 s)")
    print(f"validation pod ended -> trainer Job  {percentiles(reaction, len(observer.created))}"
          f"  (the operator's own reaction)")
    print(f"trainer Job complete -> Succeeded  {percentiles(finish_reaction, len(observer.created))}"
          f"  (the operator's own reaction)")
    print(f"create -> Succeeded        {percentiles(to_succeeded, total)}")
    print("create -> validation Job, per tenth of the run (the operator's reaction to a new job):")
    print("\n".join(by_tenth(observer.created, observer.created, observer.validation_job)))
    print("validation pod ended -> trainer Job, per tenth of the run:")
    print("\n".join(by_tenth(observer.created, validated, observer.trainer_job)))
    print(f"machine           {load_average()} at the end (the API server and controller-manager share them)")
    lifecycle_seconds = max(1e-9, lifecycle_end_wall - first_wall)
    print(f"CPU over the lifecycle ({lifecycle_seconds:.1f} s wall, {os.cpu_count()} cores): " + ", ".join(
        f"{part} {seconds:.1f} s ({seconds / lifecycle_seconds:.0%} of a core, {seconds * 1000 / max(1, args.jobs):.0f} "
        f"ms per job)" for part, seconds in sorted(cpu_used.items(), key=lambda item: -item[1])))
    print(f"operator memory   peak {peak:.0f} MiB (VmHWM; {baseline_hwm:.0f} MiB before the first job), "
          f"{current:.0f} MiB at the end (target peak < 250 MiB)")
    print(f"API requests      {total_requests} by the operator over the lifecycle = "
          f"{total_requests / max(1, args.jobs):.1f} per job; {idle_requests} in {args.idle:.0f} s idle "
          f"({args.settle:.0f} s after the last job finished) "
          f"= {idle_requests / max(1, args.jobs) / (args.idle / 60):.2f} per job per minute")
    for key, value in lifecycle.most_common():
        print(f"    {value / max(1, args.jobs):7.2f} per job  {key}")
    if idle:
        print("  idle:", ", ".join(f"{key} {value}" for key, value in idle.most_common()))
    print("RESULT " + json.dumps({
        "cpuSecondsByPart": {part: round(seconds, 2) for part, seconds in cpu_used.items()},
        "bench": "operator_scale", "jobs": args.jobs, "rate": args.rate, "succeeded": succeeded,
        "saturated": saturated, "handledPerSecond": round(handled, 3),
        "controllerManagerQps": CONTROLLER_MANAGER_QPS, "controllerManagerBurst": CONTROLLER_MANAGER_BURST,
        "trainerJobNotReached": total - len(to_trainer),
        "createToValidationJobP50": _p(to_validation, total, 0.5),
        "createToValidationJobP99": _p(to_validation, total, 0.99),
        "createToTrainerJobP50": _p(to_trainer, total, 0.5), "createToTrainerJobP99": _p(to_trainer, total, 0.99),
        "operatorReactionP50": _p(reaction, len(observer.created), 0.5),
        "operatorReactionP99": _p(reaction, len(observer.created), 0.99),
        "finishReactionP50": _p(finish_reaction, len(observer.created), 0.5),
        "finishReactionP99": _p(finish_reaction, len(observer.created), 0.99),
        "cache": args.cache, "loadAverage1m": round(os.getloadavg()[0], 2),
        "operatorPeakMiB": round(peak, 1), "requestsPerJob": round(total_requests / max(1, args.jobs), 2),
        "idleRequestsPerJobPerMinute": round(idle_requests / max(1, args.jobs) / (args.idle / 60), 3),
        **finished_memory,
    }))
    return 0 if finished else 1


COMPARED = ("createToValidationJobP50", "createToValidationJobP99", "operatorReactionP50", "operatorReactionP99",
            "finishReactionP50", "finishReactionP99", "createToTrainerJobP99", "operatorPeakMiB", "requestsPerJob",
            "idleRequestsPerJobPerMinute", "handledPerSecond")


def run_once(args: argparse.Namespace, rate: float, cache: str) -> dict[str, Any]:
    """One run of this script in a process of its own (its own control plane and operator)."""
    command = [sys.executable, __file__, "--jobs", str(args.jobs), "--rate", str(rate), "--cache", cache,
               "--idle", str(args.idle), "--settle", str(args.settle)] + (["--quick"] if args.quick else [])
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"a run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


def _spread(values: list[Any]) -> str:
    known = [v for v in values if v is not None]
    if len(known) < len(values):
        return f"not reached in {len(values) - len(known)} of {len(values)} runs"
    return f"{min(known):.4g} / {statistics.median(known):.4g} / {max(known):.4g}"


def compare(args: argparse.Namespace) -> int:
    """--compare: cache off vs on, alternating; --rates: one run per rate (cache on)."""
    print(f"{load_average()} before the runs", flush=True)
    if args.rates:
        grows_at = None
        for rate in [float(r) for r in args.rates.split(",")]:
            result = run_once(args, rate, "on")
            print(f"rate {rate:5g}/s: handled {result['handledPerSecond']:.2f}/s, "
                  f"{'SATURATED (backlog grows)' if result['saturated'] else 'kept up'}; reaction p50/p99 "
                  f"create->validation Job {result['createToValidationJobP50']}/{result['createToValidationJobP99']} s; "
                  f"load {result['loadAverage1m']}", flush=True)
            if result["saturated"] and grows_at is None:
                grows_at = rate
        print(f"the backlog starts to grow at {grows_at:g} jobs/s" if grows_at else
              "the backlog did not grow at any rate tried")
        return 0
    results: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for rep in range(args.compare):
        for side in ("off", "on"):
            results[side].append(run_once(args, args.rate, side))
            print(f"rep {rep + 1} cache {side}: " + json.dumps({k: results[side][-1].get(k) for k in COMPARED}),
                  flush=True)
    print(f"{args.jobs} jobs at {args.rate:g}/s, {args.compare} runs each side; min / median / max:")
    for key in COMPARED:
        off = [r.get(key) for r in results["off"]]
        on = [r.get(key) for r in results["on"]]
        ratio = ""
        if None not in off + on and statistics.median(on):
            ratio = f"  off/on = {statistics.median(off) / statistics.median(on):.2f}"
        print(f"  {key:30} off {_spread(off):32} on {_spread(on):32}{ratio}")
    print(f"{load_average()} after the runs")
    return 0


def _p(values: list[float], total: int, q: float) -> float | None:
    """The quantile over all `total` jobs (None: not reached by that quantile's job)."""
    value = quantile(values, total - len(values), q)
    return None if value is None else round(value, 4)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # The watch threads sit in blocking reads of connections to a control plane that is gone;
    # interpreter shutdown would wait on (or abort in) them.
    os._exit(code)
