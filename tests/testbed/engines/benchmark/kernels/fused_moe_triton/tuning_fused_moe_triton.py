"""Stand-in for SGLang's fused-MoE tuning script (see engines/tune_standin.py)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "..", ".."))
from tune_standin import main  # noqa: E402

main("sglang")
