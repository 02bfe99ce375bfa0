"""`llmkit serve` against the official `openai` client: a uvicorn server in a thread on a free loopback port, over a
tiny random decoder with the byte-level tokenizer (one server per module), plus one slow test on SmolLM2."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
import uvicorn

from llmkit.errors import LlmkitError
from llmkit.generate import generate as offline_generate
from llmkit.serve.http import ServedModel, create_app, start_engine
from tests.helpers import byte_tokenizer, tiny_decoder

API_KEY = "test-key"
MODEL = "tiny"
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
LONG = 900  # max_tokens of a request the tests cancel: far more steps than a cancellation may take


class ServerThread:
    """uvicorn running `app` in a daemon thread on a free loopback port."""

    def __init__(self, app) -> None:  # noqa: ANN001
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, "the server to start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_until(condition, what: str, timeout: float = 30.0) -> None:  # noqa: ANN001
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds (a hang guard, not a timing)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def serve_tiny(api_key: str | None = API_KEY, **engine_options):  # noqa: ANN003, ANN201
    """(server, served model, the decoder) for a tiny random decoder with a 1,024-token context."""
    model = tiny_decoder(max_seq_len=1024)
    tokenizer = byte_tokenizer(chat_template=TEMPLATE)
    served = start_engine(model, tokenizer, MODEL, **engine_options)
    app = create_app(api_key=api_key)
    app.state.llmkit.attach(served)
    server = ServerThread(app)
    wait_until(lambda: http_get(server.url + "/health")[0] == 200, "the model to load")
    return server, served, model


def http_get(url: str) -> tuple[int, str]:
    """(status, body); status 0 while nothing listens yet."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except urllib.error.URLError:
        return 0, ""


def http_post(url: str, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}", **(headers or {})}
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def tiny_server():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads
    server, served, model = serve_tiny(max_batch_size=8, max_queue=256)
    yield server, served, model
    server.stop()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(tiny_server) -> torch.nn.Module:
    return tiny_server[2]


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server[0].url + "/v1", api_key=API_KEY, max_retries=0)


def chat(client: openai.OpenAI, content: str = "Hello", **options):  # noqa: ANN201, ANN003
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **options)


def wait_idle(served: ServedModel) -> None:
    wait_until(lambda: served.engine.stats().running == 0 and served.engine.stats().waiting == 0, "the engine to idle")


# ---- the API's behaviour -------------------------------------------------------------------------------------------


def test_chat_completion_has_openai_shape_and_usage(client, tiny_server, tiny_model):
    served = tiny_server[1]
    reply = chat(client, "Hi there", max_tokens=12, temperature=0)
    prompt_ids = served.tokenizer.encode(served.tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}]))
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
    assert len(reply.choices) == 1 and reply.choices[0].index == 0 and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"  # the byte tokenizer has no EOS: every reply runs to max_tokens
    assert reply.usage.prompt_tokens == len(prompt_ids) and reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == len(prompt_ids) + 12
    # the same text as llmkit's offline greedy decoding of the rendered prompt
    expected = offline_generate(tiny_model, served.tokenizer,
                                served.tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}]),
                                max_new_tokens=12)
    assert reply.choices[0].message.content == expected


def test_completions_take_every_prompt_shape(client, tiny_server, tiny_model):
    served = tiny_server[1]
    texts = ["Once upon", "The cat"]
    expected = [offline_generate(tiny_model, served.tokenizer, text, max_new_tokens=6) for text in texts]
    batch = client.completions.create(model=MODEL, prompt=texts, max_tokens=6, temperature=0)
    assert batch.object == "text_completion" and [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == expected
    as_ids = client.completions.create(model=MODEL, prompt=served.tokenizer.encode(texts[0]), max_tokens=6, temperature=0)
    assert as_ids.choices[0].text == expected[0]
    assert batch.usage.prompt_tokens == sum(len(served.tokenizer.encode(text)) for text in texts)


def test_streamed_pieces_join_to_the_plain_reply(client):
    options = dict(max_tokens=40, temperature=0.8, seed=7)
    whole = chat(client, "Tell me a story", **options)
    pieces, usage, finish = [], None, None
    for chunk in chat(client, "Tell me a story", stream=True, stream_options={"include_usage": True}, **options):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len([p for p in pieces if p]) > 1  # really streamed
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == "length" and usage.completion_tokens == whole.usage.completion_tokens == 40


def test_same_seed_same_text_and_n_choices_use_seed_plus_index(client):
    first = chat(client, "Roll", max_tokens=16, temperature=0.8, seed=11)
    again = chat(client, "Roll", max_tokens=16, temperature=0.8, seed=11)
    other = chat(client, "Roll", max_tokens=16, temperature=0.8, seed=12)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content
    three = chat(client, "Roll", max_tokens=16, temperature=0.8, seed=11, n=3)
    assert [choice.index for choice in three.choices] == [0, 1, 2]
    assert three.choices[0].message.content == first.choices[0].message.content
    assert three.choices[1].message.content == other.choices[0].message.content
    assert three.usage.completion_tokens == 48


def test_streamed_choices_interleave_and_each_joins_to_its_plain_choice(client):
    options = dict(max_tokens=12, temperature=0.9, seed=5, n=2)
    whole = client.completions.create(model=MODEL, prompt="xy", **options)
    texts = ["", ""]
    finishes = [None, None]
    for chunk in client.completions.create(model=MODEL, prompt="xy", stream=True, **options):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [choice.text for choice in whole.choices] and texts[0] != texts[1]
    assert finishes == ["length", "length"]


def test_stop_strings_cut_the_text_and_end_the_request(client, tiny_server):
    whole = client.completions.create(model=MODEL, prompt="abc", max_tokens=60, temperature=0).choices[0].text
    stop = next(whole[i:i + 2] for i in range(5, len(whole) - 2) if "\ufffd" not in whole[i:i + 2])
    expected = whole[: whole.find(stop)]
    cut = client.completions.create(model=MODEL, prompt="abc", max_tokens=60, temperature=0, stop=[stop, "never"])
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 60
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model=MODEL, prompt="abc", max_tokens=60, temperature=0, stop=stop, stream=True) if chunk.choices)
    assert streamed == expected
    wait_idle(tiny_server[1])


def offline_logprobs(model, ids: list[int], n_new: int, k: int) -> list[tuple[float, list[float]]]:  # noqa: ANN001
    """Greedy continuation of `ids`: per new token, its log-softmax and the k largest ones, from full forwards."""
    out = []
    ids = list(ids)
    with torch.inference_mode():
        for _ in range(n_new):
            logprobs = torch.log_softmax(model(torch.tensor([ids]))[0, -1].float(), dim=-1)
            token = int(logprobs.argmax())
            out.append((float(logprobs[token]), logprobs.topk(k).values.tolist()))
            ids.append(token)
    return out


def test_logprobs_equal_offline_log_softmax(client, tiny_server, tiny_model):
    served = tiny_server[1]
    prompt = "The quick brown fox"
    ids = served.tokenizer.encode(prompt)
    expected = offline_logprobs(tiny_model, ids, 8, 3)
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
    got = completion.choices[0].logprobs
    assert len(got.token_logprobs) == 8 and got.text_offset[0] == 0
    assert got.token_logprobs == pytest.approx([chosen for chosen, _ in expected], abs=1e-4)
    rendered = served.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    expected = offline_logprobs(tiny_model, served.tokenizer.encode(rendered), 8, 3)
    reply = chat(client, prompt, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert [entry.logprob for entry in content] == pytest.approx([chosen for chosen, _ in expected], abs=1e-4)
    for entry, (_, top) in zip(content, expected):  # 1e-4: batched fp32 forwards against one-row ones
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top, abs=1e-4)


def offline_penalized_greedy(model, ids: list[int], n_new: int, presence: float, frequency: float) -> list[int]:  # noqa: ANN001
    """Greedy decoding with OpenAI's penalties, by full forwards: logit[t] -= presence * (c[t] > 0) + frequency * c[t],
    c counting the tokens generated so far."""
    ids, new = list(ids), []
    with torch.inference_mode():
        for _ in range(n_new):
            logits = model(torch.tensor([ids]))[0, -1].float()
            counts = torch.bincount(torch.tensor(new, dtype=torch.long), minlength=logits.shape[0]).float()
            token = int((logits - presence * (counts > 0).float() - frequency * counts).argmax())
            new.append(token)
            ids.append(token)
    return new


def test_sampling_fields_reach_the_engine(client, tiny_server, tiny_model):
    served = tiny_server[1]
    prompt = "aaaa"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0).choices[0].text
    penalized = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0,
                                          presence_penalty=0.5, frequency_penalty=1.5).choices[0].text
    expected = offline_penalized_greedy(tiny_model, served.tokenizer.encode(prompt), 20, 0.5, 1.5)
    assert penalized == served.tokenizer.decode(expected) and penalized != plain
    top_1 = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=1.5, seed=3,
                                       extra_body={"top_k": 1})  # an extension: not in the client's signature
    assert top_1.choices[0].text == plain  # top_k=1 leaves only the argmax, whatever the temperature
    tiny_p = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=1.5, top_p=1e-6, seed=3)
    assert tiny_p.choices[0].text == plain
    reply = chat(client, "hi", max_completion_tokens=7, max_tokens=3)  # the newer name wins, as OpenAI's does
    assert reply.usage.completion_tokens == 7


def test_a_model_without_chat_template_chats_by_plain_transcript(tiny_model):
    from llmkit.chat_template import PLAIN_STOP, plain_transcript
    from llmkit.serve import openai_api as api
    from llmkit.serve.http import chat_job

    served = ServedModel(MODEL, None, byte_tokenizer(), 1024)  # no template; no engine needed to plan the job
    body = api.parse_body(json.dumps({"model": MODEL, "stop": "###", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}).encode(),
        api.ChatCompletionRequest)
    job = chat_job(served, body)
    transcript = plain_transcript([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert job.prompts == [served.tokenizer.encode(transcript)] and transcript.endswith("Assistant:")
    assert job.stops == ("###", PLAIN_STOP) and job.max_tokens == [1024 - len(job.prompts[0])]


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def test_response_format_makes_every_reply_parse(client):
    replies = chat(client, "Give me JSON", max_tokens=40, temperature=0.8, seed=1, n=3,
                   response_format={"type": "json_object"})
    for choice in replies.choices:
        assert isinstance(json.loads(choice.message.content), dict), choice.message.content
    people = chat(client, "A person", max_tokens=60, temperature=0.8, seed=2, n=3,
                  response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    for choice in people.choices:
        person = json.loads(choice.message.content)
        assert set(person) == {"name", "age"} and isinstance(person["name"], str) and len(person["name"]) <= 12
        assert isinstance(person["age"], int) and not isinstance(person["age"], bool)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chat(
        client, "A person", max_tokens=60, temperature=0.8, seed=2, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}) if chunk.choices)
    assert streamed == people.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as error:  # a keyword the constraint cannot enforce: refused, not ignored
        chat(client, "x", response_format={"type": "json_schema", "json_schema": {
            "name": "p", "schema": {"type": "string", "pattern": "^a+$"}}})
    assert error.value.param == "response_format" and "pattern" in error.value.message


def test_models_health_and_chat_page(client, tiny_server):
    assert [model.id for model in client.models.list()] == [MODEL]
    assert http_get(tiny_server[0].url + "/health") == (200, '{"status":"ok"}')
    status, page = http_get(tiny_server[0].url + "/")
    assert status == 200 and "/v1/chat/completions" in page and "TTFT" in page


# ---- errors: OpenAI's envelope, the client's exception classes -----------------------------------------------------


def test_errors_raise_the_openai_client_classes(client, tiny_server):
    with pytest.raises(openai.BadRequestError) as error:
        chat(client, "x" * 1100)  # over the 1,024-token context
    assert error.value.code == "context_length_exceeded" and error.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as error:
        chat(client, "hi", max_tokens=10**9)
    assert error.value.code == "context_length_exceeded" and error.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=[])
    assert error.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as error:
        chat(client, "hi", temperature="hot")
    assert error.value.code == "invalid_type" and error.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert error.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError) as error:
        chat(openai.OpenAI(base_url=tiny_server[0].url + "/v1", api_key="wrong-key", max_retries=0), "hi", max_tokens=2)
    assert error.value.code == "invalid_api_key"
    request = urllib.request.Request(tiny_server[0].url + "/v1/models")  # no Authorization header at all
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(request, timeout=30)
    assert raw.value.code == 401 and json.loads(raw.value.read())["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("body, param", [
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}', None),  # malformed JSON
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', None),  # not UTF-8
    (b'[1, 2]', None),  # JSON, but not an object
    (b'{"model": "tiny", "messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2.5}', "n"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 99999999999}', "max_tokens"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0]"),  # lone surrogate
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}', "stop"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"a" * (5 * 1024 * 1024) + b'"}]}', None),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 10}}', "logit_bias"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream_options": {}}', "stream_options"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}', "top_logprobs"),
])
def test_bad_bodies_get_a_400_envelope(tiny_server, body, param):
    status, answer = http_post(tiny_server[0].url + "/v1/chat/completions", body)
    assert status == 400
    assert set(answer["error"]) == {"message", "type", "param", "code"} and isinstance(answer["error"]["code"], str)
    assert answer["error"]["param"] == param and answer["error"]["message"]


def test_unknown_route_and_method_use_the_envelope(tiny_server):
    status, answer = http_post(tiny_server[0].url + "/v1/embeddings", b"{}")
    assert status == 404 and answer["error"]["code"] == "not_found"
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(tiny_server[0].url + "/v1/chat/completions", timeout=30)
    assert error.value.code == 405 and json.loads(error.value.read())["error"]["code"] == "method_not_allowed"


def test_health_is_503_until_the_model_loads():
    server = ServerThread(create_app())
    try:
        assert http_get(server.url + "/health") == (503, '{"status":"loading"}')
        status, answer = http_post(server.url + "/v1/completions", b'{"model": "tiny", "prompt": "a"}')
        assert status == 503 and "still loading" in answer["error"]["message"]
        server.app.state.llmkit.fail(LlmkitError("model.gguf is not a GGUF file"))
        assert http_get(server.url + "/health") == (503, '{"status":"failed"}')
        status, answer = http_post(server.url + "/v1/completions", b'{"model": "tiny", "prompt": "a"}')
        assert status == 503 and "not a GGUF file" in answer["error"]["message"]
        assert answer["error"]["code"] == "model_not_ready"
    finally:
        server.stop()


# ---- cancellation, load, metrics -----------------------------------------------------------------------------------


def test_a_client_that_leaves_frees_its_slot(client, tiny_server):
    served = tiny_server[1]
    wait_idle(served)
    steps = served.engine.stats().steps
    stream = client.completions.create(model=MODEL, prompt="go", max_tokens=LONG, temperature=0, stream=True)
    for _, _ in zip(range(2), stream):
        pass
    stream.close()  # the client disconnects mid-generation
    wait_idle(served)
    assert served.engine.stats().steps - steps < LONG // 2
    impatient = openai.OpenAI(base_url=tiny_server[0].url + "/v1", api_key=API_KEY, max_retries=0, timeout=0.2)
    steps = served.engine.stats().steps
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=MODEL, prompt="go", max_tokens=LONG, temperature=0)
    wait_idle(served)  # the non-streamed request was cancelled too: its slot is free long before LONG steps
    assert served.engine.stats().steps - steps < LONG // 2
    assert chat(client, "still there?", max_tokens=3).usage.completion_tokens == 3  # the server keeps serving


def test_32_clients_x_4_requests_each_answered_exactly_once(client, tiny_server, tiny_model):
    served = tiny_server[1]
    prompts = [f"client {c} request {r}:" for c in range(32) for r in range(4)]
    expected = {p: offline_generate(tiny_model, served.tokenizer, p, max_new_tokens=4) for p in prompts}

    def one_client(c: int) -> list[tuple[str, str, str]]:
        answers = []
        for r in range(4):
            prompt = f"client {c} request {r}:"
            completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
            answers.append((prompt, completion.id, completion.choices[0].text))
        return answers

    with ThreadPoolExecutor(32) as pool:
        answers = [answer for answers in pool.map(one_client, range(32)) for answer in answers]
    assert sorted(prompt for prompt, _, _ in answers) == sorted(prompts)  # none lost, none duplicated
    assert len({id_ for _, id_, _ in answers}) == len(prompts)
    assert {prompt: text for prompt, _, text in answers} == expected  # each its own, as run alone


def test_a_full_queue_answers_429_and_nothing_else_breaks():
    server, served, _ = serve_tiny(api_key=None, max_batch_size=1, max_queue=1)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    try:
        def one(i: int) -> str:
            try:
                client.completions.create(model=MODEL, prompt=f"request {i}", max_tokens=40, temperature=0)
                return "ok"
            except openai.RateLimitError as error:
                assert error.code == "rate_limit_exceeded"
                return "429"

        with ThreadPoolExecutor(12) as pool:
            outcomes = list(pool.map(one, range(12)))
        assert "429" in outcomes and "ok" in outcomes and len(outcomes) == 12
        wait_idle(served)
        after = client.completions.create(model=MODEL, prompt="after", max_tokens=3, temperature=0)
        assert after.usage.completion_tokens == 3
    finally:
        server.stop()


def metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " ") or line.startswith(series + "{"):
            if line.rsplit(" ", 1)[0].endswith("}") or line.split(" ")[0] == series:
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} missing from /metrics")


def test_metrics_use_vllm_names_and_count_requests(client, tiny_server):
    url = tiny_server[0].url + "/metrics"
    label = 'model_name="tiny"'
    before = http_get(url)[1]
    reply = chat(client, "count me", max_tokens=5, n=2)
    status, after = http_get(url)
    assert status == 200
    delta = lambda name: metric(after, name) - metric(before, name)  # noqa: E731
    assert delta(f"vllm:prompt_tokens_total{{{label}}}") == reply.usage.prompt_tokens
    assert delta(f"vllm:generation_tokens_total{{{label}}}") == 10
    assert delta(f'vllm:request_success_total{{{label},finished_reason="length"}}') == 2
    assert delta(f"vllm:e2e_request_latency_seconds_count{{{label}}}") == 1
    assert delta(f"vllm:time_to_first_token_seconds_count{{{label}}}") == 2
    assert delta(f"vllm:inter_token_latency_seconds_count{{{label}}}") == 8
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert metric(after, f'vllm:{name}_bucket{{{label},le="+Inf"}}') == metric(after, f"vllm:{name}_count{{{label}}}")
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert f"# TYPE vllm:{gauge} gauge" in after
    queries = metric(after, f"vllm:prefix_cache_queries_total{{{label}}}")
    assert queries >= metric(after, f"vllm:prefix_cache_hits_total{{{label}}}") and queries > 0


def test_bench_serve_load_tester_against_llmkit_serve(tiny_server):
    """`llmkit bench serve`'s client against the real server: every request completes once, each streams exactly
    max_tokens tokens (the byte tokenizer has no EOS), and the server's prompt/generation counters move by as much."""
    from llmkit.serve.loadtest import run_load_test

    server, served = tiny_server[0], tiny_server[1]
    wait_idle(served)
    before = http_get(server.url + "/metrics")[1]
    prompts = [f"load test prompt {index}" for index in range(6)]
    levels = run_load_test(server.url, prompts, [1, 3], max_tokens=5, api_key=API_KEY, show_progress=False)
    for level, concurrency in zip(levels, [1, 3]):
        assert (level.concurrency, level.completed, level.failed) == (concurrency, 6, 0)
        assert level.output_tokens == 6 * 5
        assert level.ttft_ms["median"] > 0 and level.e2el_ms["mean"] >= level.ttft_ms["mean"]
    after = http_get(server.url + "/metrics")[1]
    label = 'model_name="tiny"'
    series = f"vllm:generation_tokens_total{{{label}}}"
    assert metric(after, series) - metric(before, series) == 60


# ---- real weights --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_says_paris():
    from llmkit.checkpoints import default_model_path, load_tokenizer
    from llmkit.commands.common import load_decoder
    from llmkit.commands.serve import served_name

    path = default_model_path()
    served = start_engine(load_decoder(path), load_tokenizer(path), served_name(path), max_batch_size=2)
    app = create_app()
    app.state.llmkit.attach(served)
    server = ServerThread(app)
    try:
        wait_until(lambda: http_get(server.url + "/health")[0] == 200, "SmolLM2 to load")
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="SmolLM2-135M-Instruct.Q4_1", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0)
        assert "Paris" in reply.choices[0].message.content
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        server.stop()


# ---- the command ---------------------------------------------------------------------------------------------------


def test_llmkit_serve_answers_then_sigterm_finishes_in_flight_and_exits_0(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from llmkit.checkpoints import save_model

    save_model(tiny_decoder(max_seq_len=1024), tmp_path / "tiny", byte_tokenizer(chat_template=TEMPLATE))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "llmkit.cli", "serve", "--model", str(tmp_path / "tiny"),
                                "--port", str(port), "--device", "cpu"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is not None or http_get(url + "/health")[0] == 200, "llmkit serve", 120)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [model.id for model in client.models.list()] == ["tiny"]
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(client.completions.create, model="tiny", prompt="a", max_tokens=200, temperature=0)
            wait_until(lambda: 'vllm:num_requests_running{model_name="tiny"} 1.0' in http_get(url + "/metrics")[1],
                       "the request to run")
            process.send_signal(signal.SIGTERM)
            assert in_flight.result().usage.completion_tokens == 200  # finished, not cut off
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert f"ready at http://127.0.0.1:{port}/" in out


def test_serve_refuses_a_port_in_use(capsys, tmp_path):
    from tests.helpers import cli_status

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, err = cli_status(capsys, "serve", "--model", str(tmp_path), "--port", str(taken.getsockname()[1]))
    assert code == 2 and "is already in use; pass another --port" in err


# ---- the chat page in a headless browser ---------------------------------------------------------------------------


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages ending
    in a NUL byte, commands on fd 3, replies on fd 4), so no websocket client is needed."""

    def __init__(self, executable: str, profile: str) -> None:
        import os
        import subprocess

        commands_read, self.commands = os.pipe()
        self.replies, replies_write = os.pipe()

        def wire() -> None:  # in the child: the pipes become fds 3 and 4
            os.dup2(commands_read, 3)
            os.dup2(replies_write, 4)

        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=wire, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands_read)
        os.close(replies_write)
        self.buffer, self.next_id, self.session = b"", 0, None

    def call(self, method: str, **params):  # noqa: ANN003, ANN201
        import os

        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                chunk = os.read(self.replies, 1 << 16)
                assert chunk, "chromium closed its DevTools pipe"
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def evaluate(self, expression: str):  # noqa: ANN201
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        import os

        self.process.kill()
        self.process.wait()
        os.close(self.commands)
        os.close(self.replies)


def test_chat_page_streams_a_reply_in_headless_chromium(tmp_path):
    import base64
    import shutil

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("Debian's chromium package is not installed")
    server, _, _ = serve_tiny(api_key=None, max_batch_size=2)
    browser = Chromium(executable, str(tmp_path / "profile"))
    try:
        browser.open(server.url + "/?message=Hello%20there")
        turns = "JSON.stringify([...document.querySelectorAll('.turn')].map(t => [t.className, t.textContent, " \
                "t.dataset.done || '']))"
        wait_until(lambda: (browser.evaluate(turns) or "").count('"true"') == 1, "the page's reply", 60)
        (user, user_text, _), (kind, reply, _) = json.loads(browser.evaluate(turns))
        assert (user, user_text) == ("turn user", "Hello there")
        assert kind == "turn assistant", reply  # not "turn error"
        assert "TTFT" in reply and "tok/s" in reply and "256 tokens" in reply  # the usage chunk was read
        assert len(reply.split("TTFT")[0]) > 0
        assert browser.evaluate("document.getElementById('model').textContent") == "model: tiny"
        screenshot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        assert screenshot.startswith(b"\x89PNG")
        (tmp_path / "chat.png").write_bytes(screenshot)
    finally:
        browser.close()
        server.stop()
