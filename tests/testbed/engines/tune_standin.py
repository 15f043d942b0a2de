"""Stand-in for the engines' fused-MoE tuning scripts (SGLang's tuning_fused_moe_triton.py and
vLLM's benchmark_moe.py): records when it ran, waits $TESTBED_STATE/faults/tune_sleep seconds,
then writes one config named as the real scripts name theirs."""
import argparse
import json
import os
import time
from pathlib import Path


def main(engine):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp-size", "-tp", type=int, required=True)
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--save-dir", default=".")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args()
    state = Path(os.environ.get("TESTBED_STATE", "/nonexistent"))
    start = time.time()
    try:
        time.sleep(float((state / "faults" / "tune_sleep").read_text() or 0))
    except (OSError, ValueError):
        pass
    config = os.path.join(os.environ.get("HF_HOME", ""), "hub", "models--" + args.model.replace("/", "--"))
    name = f"E=8,N={1024 // args.tp_size},device_name=NVIDIA_GB10.json"
    Path(args.save_dir, name).write_text(json.dumps({"1": {"BLOCK_SIZE_M": 16, "num_warps": 4}}) + "\n")
    with open(state / "tune-calls.jsonl", "a") as log:
        log.write(json.dumps({"engine": engine, "model": args.model, "tp": args.tp_size, "tune": args.tune,
                              "start": start, "end": time.time(), "cwd": os.getcwd(),
                              "model_cached": os.path.isdir(config),
                              "offline": os.environ.get("HF_HUB_OFFLINE")}) + "\n")
