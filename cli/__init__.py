"""The `mlx-xglm` command line, installed as `mlx_xglm.cli`."""
