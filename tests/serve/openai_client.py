"""The official `openai` client against `wkvc serve`: chat and text completions, streamed
and not, usage fields, the model list, and errors (a context overflow, a wrong key).

    python openai_client.py BASE_URL API_KEY EXPECTED_JSON

EXPECTED_JSON holds {"prompt": ..., "greedy": ...}: `wkvc run`'s greedy continuation of a
prompt, which the text completion must reproduce. Prints one JSON summary; exits non-zero on
the first failed check.
"""

import json
import sys

import openai


def check(cond, what):
    if not cond:
        print(json.dumps({"ok": False, "failed": what}))
        sys.exit(1)


def main():
    base, key, expected_path = sys.argv[1], sys.argv[2], sys.argv[3]
    expected = json.load(open(expected_path))
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
    summary = {}

    models = client.models.list()
    ids = [m.id for m in models.data]
    check(len(ids) == 1, "one model listed")
    model = ids[0]

    # text completion, greedy: wkvc run's text
    n = expected["max_tokens"]
    c = client.completions.create(
        model=model, prompt=expected["prompt"], max_tokens=n, temperature=0
    )
    check(c.object == "text_completion", "completion object")
    check(c.choices[0].text == expected["greedy"], f"greedy text {c.choices[0].text!r}")
    check(c.usage.completion_tokens <= n and c.usage.prompt_tokens > 0, "completion usage")
    check(
        c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens,
        "usage total",
    )
    summary["completion"] = c.choices[0].text

    # the same, streamed, with the usage chunk
    parts, usage, finish = [], None, None
    for chunk in client.completions.create(
        model=model,
        prompt=expected["prompt"],
        max_tokens=n,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            parts.append(ch.text)
            finish = ch.finish_reason or finish
    check("".join(parts) == expected["greedy"], "streamed text equals the plain one")
    check(usage is not None and usage.completion_tokens == c.usage.completion_tokens, "stream usage")
    check(finish in ("length", "stop"), "stream finish reason")

    # chat, plain and streamed; a stop string
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
        seed=1,
    )
    msg = r.choices[0].message
    check(r.object == "chat.completion" and msg.role == "assistant", "chat object")
    check(len(msg.content) > 0, "chat content")
    check(r.usage.completion_tokens > 0, "chat usage")
    summary["chat"] = msg.content
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
            seed=1,
            stream=True,
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    check(text == msg.content, "streamed chat equals the plain one")
    check(chunks[0].choices[0].delta.role == "assistant", "first delta has the role")
    stop_word = msg.content.split()[1] if len(msg.content.split()) > 1 else None
    if stop_word:
        s = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
            stop=[stop_word],
        )
        check(stop_word not in s.choices[0].message.content, "the stop string is not emitted")
        check(s.choices[0].finish_reason == "stop", "finish reason stop")

    # errors, as OpenAI's client raises them
    try:
        client.completions.create(model=model, prompt="hi", max_tokens=10**6)
        check(False, "a context overflow is refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400, "overflow status")
        check("context" in str(e), "overflow message")
    bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong-" + key, max_retries=0)
    try:
        bad.models.list()
        check(False, "a wrong key is refused")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, "wrong key status")
    summary["ok"] = True
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
