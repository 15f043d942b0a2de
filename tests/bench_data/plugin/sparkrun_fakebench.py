"""A stand-in benchmark framework, registered through the `sparkrun.benchmarking` entry points.

As a framework (imported by sparkrun) it builds the command line; as a script it is that command:
it reads the prompt text from the URL sparkrun gives it, sends one 1-token completion per depth and
concurrency point to the endpoint, and writes its JSON after every point (so an interrupted run
leaves partial results). `-o sleep=S` waits S seconds before each point.
"""
import json
import signal
import sys
import time
import urllib.request


if __name__ != "__main__":  # imported by sparkrun (which put itself in sys.modules) as a framework
    import sparkrun

    class FakeBench(sparkrun.BenchmarkFramework):
        name = "fakebench"
        defaults = {"depth": [0], "concurrency": [1]}

        def argv(self, job):
            return [sys.executable, __file__, job.endpoint, job.served_model, str(job.result_file),
                    json.dumps(job.args), job.prompt_url or "", job.tokenizer or ""]

        def rows(self, raw):
            return raw.get("rows", [])

        def version(self):
            return "0.1"


def as_list(value):
    return value if isinstance(value, list) else [value]


def main(endpoint, served, result_file, args_json, prompt_url, tokenizer):
    args = json.loads(args_json)
    text = urllib.request.urlopen(prompt_url, timeout=10).read().decode()
    output = {"prompt_chars": len(text), "tokenizer": tokenizer, "args": args, "rows": []}
    signal.signal(signal.SIGINT, lambda *_: sys.exit(1))
    for depth in as_list(args.get("depth", [0])):
        for concurrency in as_list(args.get("concurrency", [1])):
            time.sleep(float(args.get("sleep", 0)))
            start = time.monotonic()
            request = urllib.request.Request(f"{endpoint}/completions", data=json.dumps(
                {"model": served, "prompt": text[:200], "max_tokens": 1}).encode(),
                headers={"Content-Type": "application/json"})
            answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
            elapsed = (time.monotonic() - start) * 1000
            output["rows"].append({"depth": depth, "concurrency": concurrency, "pp": 200, "tg": 1,
                                   "pp_tps": 200 / max(elapsed, 1e-3) * 1000, "tg_tps": None,
                                   "ttfr_ms": elapsed, "answered": bool(answer.get("choices"))})
            with open(result_file, "w") as handle:
                json.dump(output, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:7]))
