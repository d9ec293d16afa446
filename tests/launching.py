"""Starting commands under MLX's launcher in tests: `mlx.launch --backend ring -n N` on localhost."""

from __future__ import annotations

import random
import shutil
import socket
import sys
from pathlib import Path


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


def free_port_pair() -> int:
    """A port p such that p and p + 1 are free (the ring backend listens on one port per rank)."""
    for _ in range(50):
        port = random.randint(20000, 60000)
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free ports")


def ring(n: int) -> list[str]:
    """The launcher's command line for `n` ring ranks on localhost, ending with `--`."""
    return [*launcher(), "--backend", "ring", "-n", str(n), "--starting-port", str(free_port_pair()), "--"]
