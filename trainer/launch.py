"""`python -m kubetune.trainer.launch --config FILE`: start one training rank per device of the pod.

The trainer container's command. It reads the world's shape from the
environment the operator writes from the pod's own resources (constants in
`kubetune.api.process`):

- `KUBETUNE_NUM_PROCESSES`: ranks in this pod, the pod's GPU count (its
  `nvidia.com/gpu` limit, the same number), 1 on CPU;
- `KUBETUNE_NUM_NODES`: pods in the run (`resources.nodes`), and
  `JOB_COMPLETION_INDEX` (set by Kubernetes in an Indexed Job): this pod's index;
- `MASTER_ADDR` / `MASTER_PORT`: where rank 0 listens for the rendezvous;
- `KUBETUNE_DEVICE`: `gpu` (nccl) or `cpu` (gloo).

A world of one runs the trainer in this process (no launcher overhead, the
single-device path of earlier releases). A larger world starts
`accelerate launch --multi_gpu` (torchrun under the hood; on CPU with
`ACCELERATE_USE_CPU`, which makes accelerate pick gloo), with
`--max_restarts 0`: one rank failing ends every rank of the pod, the pod fails,
and the Job's retry resumes all of them from the latest checkpoint.

Exit codes: torchrun turns any failed rank into exit code 1, which would hide
the trainer's permanent-error code (78) from the Job's podFailurePolicy and
the preemption code (75). Each rank therefore writes its own code to
`KUBETUNE_EXIT_DIR`, and the launcher exits with the most specific one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from kubetune.api import process
from kubetune.trainer.rank_exit import ENV_EXIT_DIR, read_rank_codes


class LaunchError(ValueError):
    """The launch environment is inconsistent; the message names the variable."""


@dataclasses.dataclass(frozen=True)
class World:
    """The run's shape as this pod sees it."""

    processes_per_node: int = 1
    """Ranks in this pod (one per GPU; 1 on CPU unless overridden)."""
    nodes: int = 1
    """Pods in the run."""
    node_rank: int = 0
    """This pod's index (0 holds rank 0)."""
    master_addr: str = "127.0.0.1"
    """Rank 0's address."""
    master_port: int = process.DEFAULT_MASTER_PORT
    """Rank 0's rendezvous port."""
    device: str = "cpu"
    """`gpu` or `cpu`."""

    @property
    def size(self) -> int:
        """World size: every rank of every pod."""
        return self.processes_per_node * self.nodes


def _positive(env: Mapping[str, str], name: str, default: int, *, minimum: int = 1) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < minimum:
        raise LaunchError(f"{name}: must be an integer >= {minimum}, got {text!r}")
    return int(text)


def world_from_environment(env: Mapping[str, str]) -> World:
    """The World the operator described in `env`; LaunchError names a bad variable."""
    nodes = _positive(env, process.ENV_NUM_NODES, 1)
    node_rank = _positive(env, process.ENV_NODE_RANK, 0, minimum=0)
    if node_rank >= nodes:
        raise LaunchError(f"{process.ENV_NODE_RANK}: pod index {node_rank} is outside {process.ENV_NUM_NODES}={nodes}")
    device = env.get(process.ENV_DEVICE, "cpu").strip() or "cpu"
    if device not in ("cpu", "gpu"):
        raise LaunchError(f"{process.ENV_DEVICE}: must be 'cpu' or 'gpu', got {device!r}")
    return World(
        processes_per_node=_positive(env, process.ENV_NUM_PROCESSES, 1),
        nodes=nodes,
        node_rank=node_rank,
        master_addr=env.get(process.ENV_MASTER_ADDR, "").strip() or "127.0.0.1",
        master_port=_positive(env, process.ENV_MASTER_PORT, process.DEFAULT_MASTER_PORT),
        device=device,
    )


def launch_command(world: World, trainer_args: Sequence[str]) -> list[str]:
    """`accelerate launch` for a world of more than one rank (pure: tests read it)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes", str(world.size),
        "--num_machines", str(world.nodes),
        "--machine_rank", str(world.node_rank),
        "--main_process_ip", world.master_addr,
        "--main_process_port", str(world.master_port),
        # One rank failing ends the attempt: the Job restarts the pod(s), the retry resumes.
        "--max_restarts", "0",
        "--monitor_interval", "1",
        # The trainer sets precision and strategy itself, from its config.
        "--mixed_precision", "no",
        "--dynamo_backend", "no",
        # CPU threads per rank: OMP_NUM_THREADS when the pod sets it, else the pod's cores shared out.
        "--num_cpu_threads_per_process", os.environ.get("OMP_NUM_THREADS", "").strip()
        or str(max(1, (os.cpu_count() or 1) // world.processes_per_node)),
        "-m", "kubetune.trainer", *trainer_args,
    ]


def launch_environment(world: World, base: Mapping[str, str], exit_dir: str) -> dict[str, str]:
    """The ranks' environment: `base` plus the exit-code folder, and gloo on CPU."""
    env = dict(base)
    env[ENV_EXIT_DIR] = exit_dir
    if world.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"  # accelerate then initialises gloo instead of nccl
    return env


def combined_exit_code(rank_codes: Sequence[int], launcher_code: int) -> int:
    """The pod's exit code: permanent (78) if any rank said so, else preempted (75) if any rank saved a
    checkpoint on SIGTERM, else 0 when the launcher succeeded, else the launcher's failure code."""
    if process.EXIT_PERMANENT in rank_codes:
        return process.EXIT_PERMANENT
    if launcher_code == 0:
        return 0
    if process.EXIT_PREEMPTED in rank_codes:
        return process.EXIT_PREEMPTED
    return launcher_code if launcher_code > 0 else 1


def run(world: World, trainer_args: Sequence[str]) -> int:
    """Start the ranks, forward SIGTERM to them, wait, and return the pod's exit code."""
    with tempfile.TemporaryDirectory(prefix="kubetune-ranks-") as exit_dir:
        process = subprocess.Popen(launch_command(world, trainer_args), env=launch_environment(world, os.environ, exit_dir),
                                   start_new_session=True)

        def forward(signum: int, _frame: object) -> None:
            # torchrun's agent passes SIGTERM to every rank, which checkpoints and exits 75.
            if process.poll() is None:
                process.send_signal(signum)

        previous = signal.signal(signal.SIGTERM, forward)
        try:
            launcher_code = process.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
        return combined_exit_code(read_rank_codes(Path(exit_dir)), launcher_code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kubetune.trainer.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="trainer config file (JSON or YAML)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    _parser().parse_args(args)
    try:
        world = world_from_environment(os.environ)
    except LaunchError as error:
        from kubetune.trainer import reporting

        message = f"launch environment: {error}"
        print(f"kubetune.trainer.launch: {message}", file=sys.stderr)
        reporting.write_termination_message(reporting.termination_summary("failed", message=message))
        return process.EXIT_PERMANENT
    if world.size == 1:
        from kubetune.trainer import __main__ as trainer

        return trainer.main(args)
    print(f"kubetune.trainer.launch: {world.size} ranks ({world.nodes} pod(s) x {world.processes_per_node}, "
          f"{world.device}), this pod is index {world.node_rank}, rank 0 at {world.master_addr}:{world.master_port}",
          file=sys.stderr, flush=True)
    return run(world, args)


if __name__ == "__main__":
    sys.exit(main())
