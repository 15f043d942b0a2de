"""What the core asks an engine about its serve command: the name it will serve, the flag that
sets it, and the API key it will demand. Runtime modules expose one of these as ENGINE."""

import shlex


def words(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:  # unbalanced quotes: the engine would fail anyway
        return command.split()


def flag_value(command: str, flags) -> str | None:
    """The value of the last of `flags` in the command (`--flag V` or `--flag=V`), else None."""
    found = None
    tokens = words(command)
    for i, token in enumerate(tokens):
        name, eq, value = token.partition("=")
        if name in flags:
            found = value if eq else (tokens[i + 1] if i + 1 < len(tokens) else "")
    return found


class Engine:
    """served_flags: flags that set the served name, the first being the one appended;
    api_key_env: variables the engine reads its API key from when the command has no --api-key;
    default_name(command): the name the engine serves without a served-name flag (None when
    only the running engine knows it)."""

    def __init__(self, served_flags: tuple, api_key_env: tuple, default_name):
        self.served_flags, self.api_key_env, self.default_name = served_flags, api_key_env, default_name

    def served_name(self, command: str, wanted: str | None) -> tuple[str, str | None]:
        """(the command, with the served-name flag appended when a name is wanted and the
        command sets none; the name the engine will really serve)."""
        given = flag_value(command, self.served_flags)
        if given is None and wanted:
            command, given = f"{command} {self.served_flags[0]} {shlex.quote(wanted)}", wanted
        return command, given or self.default_name(command)

    def api_key(self, command: str, env: dict) -> str:
        key = flag_value(command, ("--api-key",))
        if key is None:
            key = next((env[name] for name in self.api_key_env if env.get(name)), "")
        return key


def positional_after(command: str, word: str) -> str | None:
    tokens = words(command)
    if word in tokens:
        rest = tokens[tokens.index(word) + 1:]
        if rest and not rest[0].startswith("-"):
            return rest[0]
    return None


# vLLM serves its model argument (`vllm serve MODEL` or --model) under that name unless
# --served-model-name is given (docs.vllm.ai, "vllm serve" arguments; the first of several
# names is the one responses carry); the key comes from --api-key or VLLM_API_KEY
# (vllm/entrypoints/openai/api_server.py).
VLLM = Engine(("--served-model-name",), ("VLLM_API_KEY",),
              lambda command: flag_value(command, ("--model",)) or positional_after(command, "serve"))

# SGLang: served_model_name defaults to model_path (sglang/srt/server_args.py); --api-key only.
SGLANG = Engine(("--served-model-name",), (),
                lambda command: flag_value(command, ("--model-path", "--model")))

# llama-server lists `--alias` (-a) in /v1/models, else the model file it loaded: the -m path,
# or for -hf the file it downloaded into its own cache (tools/server/server.cpp); the key comes
# from --api-key or LLAMA_API_KEY (common/arg.cpp).
LLAMA_SERVER = Engine(("--alias", "-a"), ("LLAMA_API_KEY",),
                      lambda command: flag_value(command, ("-m", "--model")))
