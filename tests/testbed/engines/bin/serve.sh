#!/bin/bash
# Stand-in for the launcher script of a custom image whose ENTRYPOINT runs the server itself and
# takes the container's arguments as server flags (`exec vllm serve "$@"`), as images built
# FROM a vLLM base often do: `bash -c ...` given to it reaches vLLM, which refuses it.
exec vllm serve "$@"
