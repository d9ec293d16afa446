"""Several processes on localhost: MLX's launcher (`mlx.launch --backend ring`), or ring ranks started one
by one, each with its own arguments and folder, to see every rank's exit status and output."""

from __future__ import annotations

import json
import random
import shutil
import socket
import sys
from contextlib import ExitStack
from pathlib import Path

from xglm_fixtures import child_process


def launcher() -> list[str]:
    """MLX's launcher: the `mlx.launch` script beside this Python, on PATH, or its module."""
    script = Path(sys.executable).parent / "mlx.launch"
    if script.exists():
        return [str(script)]
    if shutil.which("mlx.launch"):
        return [shutil.which("mlx.launch")]
    return [
        sys.executable,
        "-c",
        "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())",
    ]


def launch_prefix(processes: int) -> list[str]:
    """The command line before `--` that runs a command on `processes` ring ranks of this machine."""
    return [
        *launcher(),
        "--backend",
        "ring",
        "-n",
        str(processes),
        "--starting-port",
        str(free_ports(processes)),
    ]


def free_ports(count: int = 2) -> int:
    """A port p such that p .. p + count - 1 are free (the ring backend listens on one port per rank)."""
    for _ in range(50):
        port = random.randint(20000, 60000)
        try:
            for p in range(port, port + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free ports")


def run_ranks(commands: list[list[str]], folders: list[Path], env: dict, timeout: float) -> list[tuple]:
    """Run `commands[r]` as ring rank r in `folders[r]` (what mlx.launch does, minus its I/O relay) and
    return each rank's (exit status, stdout, stderr); a rank still running after `timeout` seconds is
    killed and fails the test."""
    port = free_ports(len(commands))
    hosts = folders[0] / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(len(commands))]))
    with ExitStack() as stack:
        processes = [
            stack.enter_context(
                child_process(
                    command,
                    cwd=folder,
                    env={**env, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hosts)},
                    stdout=-1,
                    stderr=-1,
                    text=True,
                )
            )
            for rank, (command, folder) in enumerate(zip(commands, folders, strict=True))
        ]
        outputs = [process.communicate(timeout=timeout) for process in processes]
        return [(process.returncode, *output) for process, output in zip(processes, outputs, strict=True)]
