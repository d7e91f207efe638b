"""Clients for scripts/bench-serve.sh: C concurrent clients, each sending R streamed text
completions one after another to an OpenAI-compatible server (wkvc serve, llama-server);
prints one JSON line: aggregate generated tokens/s over the wall time, and the time to the
first token's p50 and p99.

    python bench_serve.py BASE_URL CLIENTS REQUESTS_PER_CLIENT MAX_TOKENS [TEMPERATURE [API_KEY]]

TEMPERATURE 0 (the default) is greedy; above it each server samples with its own sampler
(llama-server: its default chain of top-k 40, top-p 0.95, min-p 0.05; wkvc: the full softmax).
"""

import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai

PROMPTS = [
    "The history of the printing press begins",
    "In the middle of the ocean there is an island where",
    "Here is a short story about a robot who learns to paint:",
    "The three most important ideas in physics are",
    "A guide to making bread at home: first,",
    "Once upon a time, in a village by the mountains,",
    "The best way to learn a new language is",
    "Write a letter to a friend about your holiday:",
]


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def main():
    base, clients, per, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    temperature = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    key = sys.argv[6] if len(sys.argv) > 6 else "none"
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=900)
    model = client.models.list().data[0].id

    def run(c):
        out = []
        for r in range(per):
            prompt = PROMPTS[(c * per + r) % len(PROMPTS)]
            t0 = time.time()
            first, tokens, chunks = None, None, 0
            for chunk in client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=temperature,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            ):
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
                for ch in chunk.choices:
                    if ch.text:
                        chunks += 1
                        if first is None:
                            first = time.time() - t0
            out.append({"ttft": first or (time.time() - t0), "tokens": tokens if tokens is not None else chunks})
        return out

    t0 = time.time()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for r in pool.map(run, range(clients)) for x in r]
    wall = time.time() - t0
    ttft = [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    print(json.dumps({
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "aggregate_tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": round(statistics.median(ttft), 3),
        "ttft_p99_s": round(pct(ttft, 99), 3),
    }))


if __name__ == "__main__":
    main()
