"""`python3 -m sglang.launch_server` entry point of the fake SGLang."""
import sys

from fakeengine.sglang import main

if __name__ == "__main__":
    sys.exit(main())
