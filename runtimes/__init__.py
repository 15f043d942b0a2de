"""sparkrun runtimes: one plain module per engine, loaded by name when a launch needs it.

A runtime module has:
    NAME      the runtime name recipes use (e.g. "vllm-distributed")
    plan(ctx) -> list of Steps: ctx.start(rank, command) starts a container on host `rank`
              (0 is the head), ctx.wait_port(rank, address, port, reason) waits for a port.
              ctx carries the rendered serve command, hosts, rendezvous address, ports.
    EXAMPLES  (nodes, serve command, expected container commands) checked by the test suite.
    DEFAULT_COMMAND  optional: (base command, ((recipe default, flag), ...)), the serve command of
              a recipe without `command`: the base and one flag per default that has a value.
    METRICS   optional: what `status` reads from the head's Prometheus /metrics: a dict of
              figure -> metric names, the first one the server exports wins. Figures: running,
              waiting (requests), prompt_tokens, generation_tokens (counters), kv_cache (0..1).
    METRICS_FLAG  optional: the serve flag without which the engine serves no /metrics; the
              serve command gets it unless it has it already.
    ENV       optional: default container env; a recipe's own value of a variable wins.
    REPO_FLAGS  optional: {flag: (role, JSON key or None)}, the serve flags naming other Hugging
              Face repos the launch needs on every host (draft models, tokenizers).
    GGUF_QUANTS  optional: REPO_FLAGS name GGUF repos as `org/name[:QUANT]`; without a quant the
              engine loads the first of these quants the repo has, else its first model file.
    use_synced_files(command, synced)  optional: the serve command pointed at the GGUF files synced
              to the hosts instead of the repos it names; synced: (role, repo as named, file,
              multimodal projector or None) per GGUF repo, the model first.
    FAILURE_HINTS  optional: ((compiled pattern, hint), ...): a container that dies before the
              server is ready, with an error (its log tail included) the pattern finds, gets the
              hint after the error.
    SPLITS_HEADS  optional: (attention heads, key/value heads, tensor parallel) -> whether the
              engine can shard the model that way; a launch it cannot is refused at plan time.
    CACHE_ENGINE, CACHES
              optional: the engine's compile caches, {VARIABLE: subfolder}. Each host keeps them in
              ~/.cache/sparkrun/compile/<CACHE_ENGINE>, mounted into every container, with each
              VARIABLE pointing at its subfolder, so a later launch reuses what an earlier compiled.

Third-party runtimes register a module under the entry point group `sparkrun.runtimes`.
"""
