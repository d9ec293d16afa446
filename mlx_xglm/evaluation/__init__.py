"""Evaluation: scoring texts and continuations, ranking candidates, perplexity, data-parallel sharding.

The lm-evaluation-harness adapter (`mlx_xglm.evaluation.harness`, registered as `mlx-xglm`) and
`evaluate` (`mlx_xglm.evaluation.tasks`) need the optional `lm-eval` package and are imported on demand.
"""

from .distributed import is_main_process, run_sharded
from .perplexity import PerplexityResult, perplexity
from .ranking import RankResult, rank
from .scoring import ScoredText, encode_pair, loglikelihood, loglikelihood_tokens, score

__all__ = [
    "PerplexityResult",
    "RankResult",
    "ScoredText",
    "encode_pair",
    "is_main_process",
    "loglikelihood",
    "loglikelihood_tokens",
    "perplexity",
    "rank",
    "run_sharded",
    "score",
]
