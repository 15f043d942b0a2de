"""eugr's spark-vllm-docker recipes (recipe_version "1", build_args, mods): the Ray flow, with
the command used as written (these commands name their model themselves)."""

from sparkrun_runtimes import ray_flow, vllm_ray

NAME = "eugr-vllm"
DEFAULT_COMMAND = vllm_ray.DEFAULT_COMMAND  # eugr's own runner builds the same `vllm serve` line
REPO_FLAGS = vllm_ray.REPO_FLAGS
METRICS = vllm_ray.METRICS
ENV, CACHE_ENGINE, CACHES = vllm_ray.ENV, vllm_ray.CACHE_ENGINE, vllm_ray.CACHES


def plan(ctx):
    command = ctx.serve_command if ctx.nodes == 1 else vllm_ray.serve_command(ctx.serve_command, ctx.data_parallel)
    return ray_flow.plan(ctx, command)


EXAMPLES = vllm_ray.EXAMPLES
