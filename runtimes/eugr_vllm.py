"""eugr's spark-vllm-docker recipes (recipe_version "1", build_args, mods): the Ray flow, with
the command used as written (these commands name their model themselves), without the Ray
backend when solo."""

from sparkrun_runtimes import vllm_ray

NAME = "eugr-vllm"
DEFAULT_COMMAND = vllm_ray.DEFAULT_COMMAND  # eugr's own runner builds the same `vllm serve` line
REPO_FLAGS = vllm_ray.REPO_FLAGS
METRICS = vllm_ray.METRICS
ENV, CACHE_ENGINE, CACHES = vllm_ray.ENV, vllm_ray.CACHE_ENGINE, vllm_ray.CACHES
SPLITS_HEADS = vllm_ray.SPLITS_HEADS
ENGINE = vllm_ray.ENGINE
plan = vllm_ray.plan


EXAMPLES = vllm_ray.EXAMPLES
