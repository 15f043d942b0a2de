"""`python3 -m vllm.entrypoints.openai.api_server` of the fake vLLM."""
import sys

from fakeengine.vllm import main

if __name__ == "__main__":
    sys.exit(main(["serve"] + sys.argv[1:]))
