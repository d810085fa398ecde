"""Serving behaviour through real HTTP: concurrency, cancellation, the KV pool, limits, shutdown."""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serverutil import data_uri, image_message, png_bytes, start_server

openai = pytest.importorskip("openai")


def chat(server, messages, timeout=120, **fields):
    body = {"model": server.model, "messages": messages, "temperature": 0, **fields}
    return httpx.post(server.api + "/chat/completions", json=body, timeout=timeout)


def wait_until(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def pool_is_full(server) -> bool:
    m = server.metrics()
    return (m["phivision_kv_blocks_free"] == m["phivision_kv_blocks_total"] and m["phivision_requests_running"] == 0
            and m["phivision_requests_waiting"] == 0)


def varied_requests(n: int) -> list[list[dict]]:
    """n different conversations: images of different sizes (or none), different questions."""
    requests = []
    for i in range(n):
        question = f"Question {i}: what is in picture number {i}? " + "Please be specific. " * (i % 4)
        if i % 3 == 2:
            requests.append([{"role": "user", "content": question}])
        else:
            requests.append([image_message(question, png_bytes(64 + 16 * (i % 5), 48 + 8 * (i % 7), seed=i))])
    return requests


def test_32_concurrent_requests_give_the_same_greedy_text_as_alone(server):
    client = openai.OpenAI(base_url=server.api, api_key="x", max_retries=0, timeout=300)
    requests = varied_requests(32)

    def ask(messages):
        r = client.chat.completions.create(model=server.model, messages=messages, max_tokens=12, temperature=0,
                                           extra_body={"num_crops": 4})
        return r.choices[0].message.content, r.usage.completion_tokens

    def lookahead_used() -> float:
        text = httpx.get(server.url + "/metrics", timeout=10).text
        return float(text.split('phivision_lookahead_steps_total{outcome="used"} ')[1].split()[0])

    before = lookahead_used()
    alone = [ask(m) for m in requests]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, requests))
    assert together == alone
    assert lookahead_used() > before  # decode steps were queued ahead (the test server runs with it on)
    assert len(set(text for text, _ in alone)) > 1  # the requests really differ
    wait_until(lambda: pool_is_full(server), what="the KV pool to be free again")


def test_a_cancelled_stream_frees_its_kv_blocks(server):
    before = server.metrics()
    body = {"model": server.model, "messages": [image_message("Tell a long story.", png_bytes(80, 80, seed=3))],
            "max_tokens": 1200, "temperature": 0, "ignore_eos": True, "stream": True, "num_crops": 4}
    with httpx.stream("POST", server.api + "/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [line for _, line in zip(range(6), lines) if line.startswith("data:")]
        assert received
        # The request holds blocks while it runs.
        assert server.metrics()["phivision_kv_blocks_free"] < before["phivision_kv_blocks_total"]
    # Closing the connection mid-answer cancels the request at once.
    wait_until(lambda: pool_is_full(server), timeout=10, what="the cancelled request's blocks")
    assert server.metrics()["phivision_requests_aborted_total"] > before["phivision_requests_aborted_total"]


def test_a_client_that_times_out_on_a_plain_request_cancels_it(server):
    before = server.metrics()["phivision_requests_aborted_total"]
    with pytest.raises(httpx.TimeoutException):
        chat(server, [{"role": "user", "content": "Count to a thousand."}], timeout=1.0, max_tokens=1900, ignore_eos=True)
    wait_until(lambda: server.metrics()["phivision_requests_aborted_total"] > before, timeout=10, what="the abort")
    wait_until(lambda: pool_is_full(server), timeout=10, what="the KV pool to be free again")


def test_after_200_requests_the_kv_pool_is_full_again(server):
    requests = varied_requests(20)

    def one(i):
        fields = {"max_tokens": 3 + i % 5, "num_crops": 4}
        if i % 10 == 0:  # some streamed, some cut short by a stop string
            fields["stream"] = True
        if i % 7 == 0:
            fields["stop"] = ["e"]
        return chat(server, requests[i % len(requests)], **fields).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(200)))
    assert codes == [200] * 200
    wait_until(lambda: pool_is_full(server), what="the KV pool to be free again")


def test_stop_strings_cut_the_answer(server):
    messages = [{"role": "user", "content": "Say something."}]
    full = chat(server, messages, max_tokens=24).json()["choices"][0]["message"]["content"]
    assert len(full) > 4
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = chat(server, messages, max_tokens=24, stop=[stop]).json()["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["message"]["content"] == full[: full.index(stop)]


def test_a_seed_repeats_a_sampled_answer(server):
    messages = [{"role": "user", "content": "Write a word."}]
    fields = dict(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    first = chat(server, messages, **fields).json()["choices"][0]["message"]["content"]
    again = chat(server, messages, **fields).json()["choices"][0]["message"]["content"]
    assert first == again


def test_tokenize_counts_what_a_completion_uses(server):
    messages = [image_message("How many tokens is this?", png_bytes(200, 120, seed=9))]
    counted = httpx.post(server.api + "/tokenize", json={"messages": messages, "num_crops": 4}, timeout=30).json()
    used = chat(server, messages, max_tokens=2, num_crops=4).json()["usage"]["prompt_tokens"]
    assert counted["count"] == used
    assert counted["num_crops"] == 4 and len(counted["image_tokens"]) == 1 and counted["image_tokens"][0] > 144


def test_tokenize_reads_headers_and_a_completion_checks_the_whole_image(server):
    """/v1/tokenize counts from the image header (a truncated PNG still counts, as its size is known);
    a completion decodes the whole image and refuses the same bytes; no header at all is refused by both."""
    whole = png_bytes(200, 120, seed=9)
    truncated = whole[: len(whole) // 2]
    messages = [image_message("How many tokens is this?", truncated)]
    counted = httpx.post(server.api + "/tokenize", json={"messages": messages, "num_crops": 4}, timeout=30)
    assert counted.status_code == 200, counted.text
    full = httpx.post(server.api + "/tokenize", json={"messages": [image_message("How many tokens is this?", whole)],
                                                      "num_crops": 4}, timeout=30).json()
    assert counted.json()["count"] == full["count"]
    refused = chat(server, messages, max_tokens=2, num_crops=4)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_image", refused.text
    garbage = [image_message("And this?", b"not an image at all")]
    for response in (httpx.post(server.api + "/tokenize", json={"messages": garbage}, timeout=30),
                     chat(server, garbage, max_tokens=2)):
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_image", response.text


def test_health_and_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    before = server.metrics()["phivision_generation_tokens_total"]
    client = openai.OpenAI(base_url=server.api, api_key="x", max_retries=0, timeout=300)
    answer = client.chat.completions.create(model=server.model, messages=varied_requests(1)[0], max_tokens=5,
                                            temperature=0, extra_body={"ignore_eos": True})
    text = httpx.get(server.url + "/metrics").text
    for name in ("phivision_requests_waiting", "phivision_requests_running", "phivision_kv_cache_usage_ratio",
                 "phivision_generation_tokens_per_second", "phivision_time_to_first_token_seconds_bucket"):
        assert name in text
    assert server.metrics()["phivision_generation_tokens_total"] - before == answer.usage.completion_tokens == 5


# ------------------------------------------------------------------ bad input, each with its status

def big_noise_png() -> bytes:
    return png_bytes(800, 800, seed=5)  # ~1.9 MB of incompressible pixels: over --max-image-mb 1


def pixel_bomb_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")  # 81 MP in a few KB: over the 64 MP default
    return buf.getvalue()


GOOD_MESSAGES = [{"role": "user", "content": "Hello."}]
BAD_INPUTS = {
    # id: (body as bytes or dict, expected status, a word the error message must contain)
    "malformed JSON": (b'{"model": "tiny", "messages": [', 400, "JSON"),
    "body not an object": (b"[1, 2]", 400, "object"),
    "missing messages": ({"model": "tiny"}, 422, "messages"),
    "empty messages": ({"model": "tiny", "messages": []}, 422, "messages"),
    "unknown role": ({"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, 422, "role"),
    "unknown part type": ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 422, "type"),
    "unknown field": ({"model": "tiny", "messages": GOOD_MESSAGES, "max_token": 5}, 422, "max_token"),
    "negative temperature": ({"model": "tiny", "messages": GOOD_MESSAGES, "temperature": -1}, 422, "temperature"),
    "top_p zero": ({"model": "tiny", "messages": GOOD_MESSAGES, "top_p": 0}, 422, "top_p"),
    "max_tokens zero": ({"model": "tiny", "messages": GOOD_MESSAGES, "max_tokens": 0}, 422, "max_tokens"),
    "too many stop strings": ({"model": "tiny", "messages": GOOD_MESSAGES, "stop": ["a"] * 17}, 422, "stop"),
    "unknown model": ({"model": "gpt-4o", "messages": GOOD_MESSAGES}, 404, "gpt-4o"),
    "n above 1": ({"model": "tiny", "messages": GOOD_MESSAGES, "n": 2}, 400, "n > 1"),
    "logprobs": ({"model": "tiny", "messages": GOOD_MESSAGES, "logprobs": True}, 400, "logprobs"),
    "tag without image": ({"model": "tiny", "messages": [{"role": "user", "content": "<|image_1|>\nWhat?"}]}, 400, "image"),
    "tag out of range": ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(png_bytes(8, 8))}},
        {"type": "text", "text": "and <|image_2|>"}]}]}, 400, "tag"),
    "too many images": ({"model": "tiny", "messages": [image_message("x", *[png_bytes(8, 8, seed=i) for i in range(5)])]},
                        400, "at most 4"),
    "corrupt image": ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(b"this is not a png at all")}}]}]}, 400, "image 1"),
    "truncated image": ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(png_bytes(64, 64)[:300])}}]}]}, 400, "image 1"),
    "invalid base64": ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@not-base64@@@"}}]}]}, 400, "base64"),
    "image bytes too large": ({"model": "tiny", "messages": [image_message("x", big_noise_png())]}, 400, "limit"),
    "image pixels too many": ({"model": "tiny", "messages": [image_message("x", pixel_bomb_png())]}, 400, "pixels"),
    "http URL not allowed": ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]}, 400, "--allow-urls"),
    "local path not allowed": ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}, 400, "--image-dir"),
    "prompt over the context": ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 3000}]},
                                400, "context length"),
    "max_tokens over the context": ({"model": "tiny", "messages": GOOD_MESSAGES, "max_tokens": 5000}, 400, "context length"),
    "body too large": ({"model": "tiny", "messages": [{"role": "user", "content": "x" * (5 * 2**20)}]}, 413, "limit"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_gets_its_status_and_the_server_goes_on(server, case):
    body, status, word = BAD_INPUTS[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server.api + "/chat/completions", content=content,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert word.lower() in error["message"].lower(), error
    assert error["type"] in ("invalid_request_error", "server_error")
    # The server still answers.
    ok = chat(server, GOOD_MESSAGES, max_tokens=2)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


# ------------------------------------------------------------------ a restricted server

@pytest.fixture(scope="module")
def restricted(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    (folder / "cat.png").write_bytes(png_bytes(40, 30, seed=11))
    handle = start_server(tiny_checkpoint, tmp_path_factory.mktemp("restricted"), "--api-key", "sesame",
                          "--max-num-seqs", "1", "--max-queued", "0", "--image-dir", str(folder))
    handle.image_dir = folder
    yield handle
    assert handle.stop() == 0, handle.log()[-3000:]


def authorized(key="sesame"):
    return {"authorization": f"Bearer {key}"}


def test_api_key_is_required(restricted):
    body = {"model": "tiny", "messages": GOOD_MESSAGES, "max_tokens": 2}
    for headers in ({}, authorized("wrong")):
        r = httpx.post(restricted.api + "/chat/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(restricted.api + "/models").status_code == 401
    assert httpx.post(restricted.api + "/chat/completions", json=body, headers=authorized(), timeout=30).status_code == 200
    client = openai.OpenAI(base_url=restricted.api, api_key="sesame", max_retries=0)
    assert client.chat.completions.create(model="tiny", messages=GOOD_MESSAGES, max_tokens=2).usage.completion_tokens == 2


def test_local_files_only_under_the_image_folder(restricted):
    def ask(url):
        body = {"model": "tiny", "max_tokens": 2, "num_crops": 4,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
        return httpx.post(restricted.api + "/chat/completions", json=body, headers=authorized(), timeout=30)

    assert ask("cat.png").status_code == 200
    assert ask(f"file://{restricted.image_dir / 'cat.png'}").status_code == 200
    for outside in ("../../../../etc/hostname", "/etc/hostname", "file:///etc/hostname"):
        r = ask(outside)
        assert r.status_code == 400 and "outside" in r.json()["error"]["message"], r.text
    assert ask("missing.png").status_code == 400


def test_a_full_queue_answers_503(restricted):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 1900,
            "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", restricted.api + "/chat/completions", json=body, headers=authorized(), timeout=60) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # keep a reference: a collected iterator closes the response
        next(lines)
        r = httpx.post(restricted.api + "/chat/completions", json={**body, "stream": False}, headers=authorized(), timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
        assert r.headers.get("retry-after")
    # Not just "running == 0": before the engine's first step after the request, its stats still say
    # 0 running; the waiting gauge also counts requests the server holds, so both must be 0.
    wait_until(lambda: pool_is_full(restricted), what="the cancelled request to end")
    ok = httpx.post(restricted.api + "/chat/completions", json={**body, "stream": False, "max_tokens": 2},
                    headers=authorized(), timeout=30)
    assert ok.status_code == 200, ok.text


def test_shutdown_lets_running_answers_finish(tiny_checkpoint, tmp_path):
    handle = start_server(tiny_checkpoint, tmp_path, "--drain-timeout", "60")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "A long answer, please."}], "max_tokens": 400,
            "ignore_eos": True, "temperature": 0, "stream": True}
    lines: list[str] = []

    def read():
        with httpx.stream("POST", handle.api + "/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                lines.append(line)

    reader = threading.Thread(target=read)
    reader.start()
    wait_until(lambda: len(lines) >= 4, what="the first tokens")
    handle.process.send_signal(signal.SIGTERM)
    reader.join(120)
    # uvicorn exits by re-raising the signal once it has shut down gracefully.
    assert handle.process.wait(60) in (0, -signal.SIGTERM), handle.log()[-3000:]
    events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    finishes = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finishes[-1] == "length"
    text_events = [e for e in events[:-1] if json.loads(e)["choices"][0]["delta"].get("content")]
    assert len(text_events) > 100  # the whole answer came, not a cut-off one
    with pytest.raises(httpx.TransportError):
        httpx.get(handle.url + "/health", timeout=2)


def test_base64_image_round_trip_matches_the_python_api(server, tiny_checkpoint):
    """The server's answer for an image equals phivision's own API on the same checkpoint."""
    import phivision

    image = png_bytes(72, 40, seed=21)
    messages = [image_message("What is this?", image)]
    served = chat(server, messages, max_tokens=10, num_crops=4).json()["choices"][0]["message"]["content"]
    pv = phivision.load(str(tiny_checkpoint), device="cpu", progress=False)
    local = pv.chat([{"role": "user", "content": [{"type": "image", "image": base64.b64decode(data_uri(image).split(",")[1])},
                                                  {"type": "text", "text": "What is this?"}]}],
                    num_crops=4, max_new_tokens=10)
    assert served == local.text


def test_a_dead_engine_ends_running_answers_and_fails_health(tiny_checkpoint, tmp_path):
    """If the engine process dies (killed, out of memory), running streams end with an error event,
    /health says so (503) and new requests get 503 at once, instead of hanging."""
    import os
    from pathlib import Path

    handle = start_server(tiny_checkpoint, tmp_path)
    children = Path(f"/proc/{handle.process.pid}/task/{handle.process.pid}/children").read_text().split()
    engine = [pid for pid in children if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(engine) == 1, children
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Keep going."}], "max_tokens": 1900,
            "ignore_eos": True, "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", handle.api + "/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data:")
            os.kill(int(engine[0]), signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]" and "engine process exited" in rest[-2]
        assert httpx.get(handle.url + "/health", timeout=5).status_code == 503
        r = chat(handle, GOOD_MESSAGES, max_tokens=2, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped"
    finally:
        handle.stop()
