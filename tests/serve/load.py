"""A bounded load test of `wkvc serve` on loopback with the official `openai` client.

    python load.py BASE_URL API_KEY EXPECTED_JSON [REQUESTS] [CONCURRENCY]

EXPECTED_JSON: a list of {"prompt", "max_tokens", "greedy"}: `wkvc run`'s greedy continuation
of each prompt. REQUESTS requests (default 64), CONCURRENCY at a time (default 16), go over
those prompts: a third streamed, one in eight cancelled midway (its stream closed after a few
chunks), the rest read whole. Every request must get a complete, well-formed answer (or, when
cancelled, stop cleanly); every greedy answer must equal `wkvc run`'s. Afterwards /metrics
must show nothing running or waiting and a KV utilisation of 0. Prints a JSON summary; exits
non-zero when a check fails.
"""

import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai


def metrics(base):
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


def main():
    base, key, expected_path = sys.argv[1], sys.argv[2], sys.argv[3]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    conc = int(sys.argv[5]) if len(sys.argv) > 5 else 16
    cases = json.load(open(expected_path))
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=600)
    model = client.models.list().data[0].id

    def one(i):
        case = cases[i % len(cases)]
        mode = "cancel" if i % 8 == 7 else ("stream" if i % 3 == 0 else "plain")
        t0 = time.time()
        try:
            if mode == "plain":
                r = client.completions.create(
                    model=model,
                    prompt=case["prompt"],
                    max_tokens=case["max_tokens"],
                    temperature=0,
                )
                text = r.choices[0].text
                ok = (
                    text == case["greedy"]
                    and r.choices[0].finish_reason in ("stop", "length")
                    and r.usage.completion_tokens > 0
                )
                return {"i": i, "mode": mode, "ok": ok, "text": text, "s": time.time() - t0}
            stream = client.completions.create(
                model=model,
                prompt=case["prompt"],
                max_tokens=case["max_tokens"],
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            parts, finish, usage, got = [], None, None, 0
            for chunk in stream:
                got += 1
                if chunk.usage is not None:
                    usage = chunk.usage
                for ch in chunk.choices:
                    parts.append(ch.text)
                    finish = ch.finish_reason or finish
                if mode == "cancel" and got >= 3:
                    stream.close()
                    return {"i": i, "mode": mode, "ok": True, "s": time.time() - t0}
            text = "".join(parts)
            ok = text == case["greedy"] and finish in ("stop", "length") and usage is not None
            return {"i": i, "mode": mode, "ok": ok, "text": text, "s": time.time() - t0}
        except openai.APIStatusError as e:
            return {"i": i, "mode": mode, "ok": False, "error": f"{e.status_code} {e}"}
        except Exception as e:  # a broken connection, a malformed answer
            return {"i": i, "mode": mode, "ok": False, "error": repr(e)}

    t0 = time.time()
    with ThreadPoolExecutor(conc) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.time() - t0
    # the server notices the cancelled streams at its next step
    for _ in range(100):
        m = metrics(base)
        if m.get("wkvc_requests_running", 1) == 0 and m.get("wkvc_requests_waiting", 1) == 0:
            break
        time.sleep(0.1)
    bad = [r for r in results if not r["ok"]]
    summary = {
        "requests": n,
        "concurrency": conc,
        "wall_s": round(wall, 2),
        "ok": len(results) - len(bad),
        "failed": bad[:5],
        "by_mode": {
            k: sum(1 for r in results if r["mode"] == k) for k in ("plain", "stream", "cancel")
        },
        "metrics": {
            k: m.get(k)
            for k in (
                "wkvc_requests_running",
                "wkvc_requests_waiting",
                "wkvc_kv_cache_utilization",
                "wkvc_generation_tokens_total",
            )
        },
    }
    print(json.dumps(summary))
    clean = (
        m.get("wkvc_requests_running") == 0
        and m.get("wkvc_requests_waiting") == 0
        and m.get("wkvc_kv_cache_utilization") == 0
    )
    sys.exit(0 if not bad and clean else 1)


if __name__ == "__main__":
    main()
