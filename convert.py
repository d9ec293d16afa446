"""Convert an XGLM checkpoint to MLX: the same as `mlx-xglm convert` (run with --help for the options)."""

import sys

from mlx_xglm.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
