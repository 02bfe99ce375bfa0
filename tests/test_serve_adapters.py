"""Multi-LoRA serving: the engine against each request run alone on a model with its adapter merged into the weights
(the reference: sharing a batch with other adapters must not change a request's tokens), the adapter registry's
LRU, the prefix cache's separation by adapter, the HTTP routes (model field, /v1/models, POST/DELETE /v1/adapters,
404 envelopes), and one slow test on SmolLM2."""

from __future__ import annotations

import copy
import json

import openai
import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.generate import generate_tokens
from llmkit.peft.lora import merge_lora
from llmkit.peft.registry import load_adapter
from llmkit.serve import Engine, Request
from llmkit.serve.adapters import AdapterRegistry, UnknownAdapterError
from llmkit.serve.http import create_app, start_engine
from tests.helpers import byte_tokenizer, random_lora_dir, tiny_decoder
from tests.test_serve_engine import random_prompt, run_to_end, tokens_of
from tests.test_serve_http import API_KEY, ServerThread, http_get, http_post, wait_until

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ("alpha", "beta", "gamma")
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny decoder, three adapter directories (ranks 2, 4, 8; B large enough to change greedy tokens), and each
    adapter's merged model (the reference)."""
    base = tiny_decoder()
    root = tmp_path_factory.mktemp("adapters")
    paths = {name: random_lora_dir(base, root / name, rank, seed, std=0.5, targets=("q_proj", "v_proj", "o_proj"))
             for seed, (name, rank) in enumerate(zip(NAMES, (2, 4, 8)))}
    merged = {name: merge_lora(load_adapter(copy.deepcopy(base), path)).eval() for name, path in paths.items()}
    merged[None] = base
    return base, paths, merged


def alone(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    return [step[0] for step in generate_tokens(model, prompt, NEW_TOKENS) if step[0] is not None]


def engine_for(setup, max_loaded: int = 3, **options) -> tuple[Engine, AdapterRegistry]:
    base, paths, _ = setup
    model = copy.deepcopy(base)
    registry = AdapterRegistry(model, paths, max_loaded)
    return Engine(model, adapters=registry, **options), registry


def test_adapters_share_a_decode_batch(setup):
    _, _, merged = setup
    engine, registry = engine_for(setup, max_batch_size=8, prefill_chunk=128)
    wanted = ["alpha", None, "beta", "gamma", "alpha", None]
    prompts = [random_prompt(5 + 3 * i, seed=i) for i in range(len(wanted))]
    handles = [engine.submit(Request(prompt, NEW_TOKENS, adapter=name)) for prompt, name in zip(prompts, wanted)]
    engine.step()  # admits all six and prefills every prompt (5 + 8 + ... + 20 = 75 tokens: one 128-token chunk)
    first = [handle.events_ready() for handle in handles]
    assert engine.stats().running == 6 and all(len(events) == 1 for events in first)
    steps = engine.stats().steps
    run_to_end(engine)
    assert engine.stats().steps - steps == NEW_TOKENS - 1  # every later token came from a shared decode step
    outputs = [tokens_of(events + list(handle.events(timeout=5))) for events, handle in zip(first, handles)]
    expected = [alone(merged[name], prompt) for prompt, name in zip(prompts, wanted)]
    assert outputs == expected
    assert len({tuple(tokens) for tokens in expected}) == len(wanted)  # the adapters change the greedy tokens
    assert sorted(registry.loaded()) == ["alpha", "beta", "gamma"] and registry.loads == 3


def test_lru_eviction_and_reload_give_the_same_tokens(setup):
    _, _, merged = setup
    engine, registry = engine_for(setup, max_loaded=1, prefix_cache=False)
    prompt = random_prompt(12, seed=7)
    outputs = []
    for name in ("alpha", "beta", "alpha", None, "beta"):
        handle = engine.submit(Request(prompt, NEW_TOKENS, adapter=name))
        run_to_end(engine)
        outputs.append(tokens_of(list(handle.events(timeout=5))))
        assert len(registry.loaded()) <= 1
    assert registry.loads == 4  # alpha, beta, alpha again (evicted by beta), beta again; the base needs none
    assert outputs[0] == outputs[2] == alone(merged["alpha"], prompt)
    assert outputs[1] == outputs[4] == alone(merged["beta"], prompt)
    assert outputs[3] == alone(merged[None], prompt)


def test_an_adapter_in_use_is_never_evicted(setup):
    _, _, merged = setup
    engine, registry = engine_for(setup, max_loaded=1, max_batch_size=4)
    prompts = [random_prompt(6, seed=1), random_prompt(6, seed=2)]
    first = engine.submit(Request(prompts[0], NEW_TOKENS, adapter="alpha"))
    second = engine.submit(Request(prompts[1], NEW_TOKENS, adapter="beta"))
    base_row = engine.submit(Request(prompts[1], NEW_TOKENS))  # FIFO: waits behind beta
    engine.step()
    assert registry.loaded() == ["alpha"] and registry.in_use("alpha") == 1
    assert engine.stats().running == 1 and engine.stats().waiting == 2  # beta waits for alpha's request to end
    run_to_end(engine)
    assert registry.loaded() == ["beta"]
    assert tokens_of(list(first.events(timeout=5))) == alone(merged["alpha"], prompts[0])
    assert tokens_of(list(second.events(timeout=5))) == alone(merged["beta"], prompts[1])
    assert tokens_of(list(base_row.events(timeout=5))) == alone(merged[None], prompts[1])


def test_prefix_cache_does_not_cross_adapters(setup):
    _, _, merged = setup
    engine, _ = engine_for(setup, max_batch_size=2)
    prompt = random_prompt(40, seed=3)
    results = {}
    for name in ("alpha", "beta", None, "beta"):
        hits = engine.stats().prefix_cache_hits
        handle = engine.submit(Request(prompt, NEW_TOKENS, adapter=name))
        run_to_end(engine)
        results[name] = tokens_of(list(handle.events(timeout=5)))
        reused = engine.stats().prefix_cache_hits - hits
        assert results[name] == alone(merged[name], prompt), name
    assert reused == len(prompt) - 1  # the second beta request reuses the first one's keys/values
    assert engine.stats().prefix_cache_hits == len(prompt) - 1  # ... and nothing crossed between adapters


def test_unknown_adapter_and_runtime_changes(setup, tmp_path):
    base, paths, merged = setup
    engine, registry = engine_for(setup)
    with pytest.raises(UnknownAdapterError, match=r"no adapter named 'delta'; the server offers \['alpha', 'beta'"):
        engine.submit(Request([1, 2, 3], 4, adapter="delta"))
    with pytest.raises(LlmkitError, match=r"names adapter 'alpha' but this engine serves no adapters"):
        Engine(copy.deepcopy(base)).submit(Request([1, 2, 3], 4, adapter="alpha"))
    registry.add("delta", paths["gamma"])
    handle = engine.submit(Request([1, 2, 3], NEW_TOKENS, adapter="delta"))
    run_to_end(engine)
    assert tokens_of(list(handle.events(timeout=5))) == alone(merged["gamma"], [1, 2, 3])
    registry.remove("delta")
    engine.step()  # sync: unused, so unloaded now
    assert "delta" not in registry.loaded() and "delta" not in registry.names()
    with pytest.raises(LlmkitError, match=r"is not a directory"):
        registry.add("epsilon", tmp_path / "missing")
    with pytest.raises(LlmkitError, match=r"adapter name '1bad' must be letters, digits and _"):
        registry.add("1bad", paths["alpha"])


# ---- HTTP -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_server(setup):
    base, paths, merged = setup
    tokenizer = byte_tokenizer()
    served = start_engine(copy.deepcopy(base), tokenizer, "tiny", adapters={"alpha": paths["alpha"]},
                          max_loaded_adapters=2, max_batch_size=4)
    app = create_app(api_key=API_KEY)
    app.state.llmkit.attach(served)
    server = ServerThread(app)
    wait_until(lambda: http_get(server.url + "/health")[0] == 200, "the model to load")
    yield server, served, tokenizer
    server.stop()


def completion(server, model: str, prompt: str) -> tuple[int, dict]:
    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
    return http_post(server.url + "/v1/completions", json.dumps(body).encode())


def http_delete(url: str) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {API_KEY}"}, method="DELETE")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_http_model_field_picks_the_adapter(adapter_server, setup):
    server, served, tokenizer = adapter_server
    _, _, merged = setup
    prompt = "The king said"
    ids = tokenizer.encode(prompt)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    for model, reference in (("alpha", merged["alpha"]), ("tiny:alpha", merged["alpha"]), ("tiny", merged[None])):
        reply = client.completions.create(model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0)
        assert reply.choices[0].text == tokenizer.decode(alone(reference, ids)), model
        assert reply.model == model  # the answer names the adapter (or base) that wrote it
    listed = client.models.list()
    assert [model.id for model in listed.data] == ["tiny", "alpha"]
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="tiny:nothing", prompt=prompt, max_tokens=2)
    assert error.value.code == "model_not_found" and "the adapters ['alpha']" in error.value.message


def test_http_load_and_unload_at_run_time(adapter_server, setup, tmp_path):
    server, served, tokenizer = adapter_server
    _, paths, merged = setup
    status, card = http_post(server.url + "/v1/adapters",
                             json.dumps({"name": "beta", "path": str(paths["beta"])}).encode())
    assert status == 200 and card["id"] == "beta" and card["parent"] == "tiny"
    assert "beta" in served.adapters.loaded()  # loaded when offered, on the engine's thread
    status, body = completion(server, "beta", "Once upon")
    assert status == 200, body
    assert body["choices"][0]["text"] == tokenizer.decode(alone(merged["beta"], tokenizer.encode("Once upon")))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    assert [model.id for model in client.models.list().data] == ["tiny", "alpha", "beta"]
    status, body = http_delete(server.url + "/v1/adapters/beta")
    assert status == 200 and body == {"id": "beta", "object": "model", "deleted": True}
    assert "beta" not in served.adapters.loaded()
    status, body = completion(server, "beta", "Once upon")
    assert status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    status, body = http_delete(server.url + "/v1/adapters/beta")
    assert status == 404 and "no adapter named 'beta'" in body["error"]["message"]
    # bad paths: a readable 400, and nothing offered
    status, body = http_post(server.url + "/v1/adapters",
                             json.dumps({"name": "gone", "path": str(tmp_path / "missing")}).encode())
    assert status == 400 and "is not a directory" in body["error"]["message"]
    wrong = tiny_decoder(d_model=32, n_heads=2, n_kv_heads=1)
    random_lora_dir(wrong, tmp_path / "wrong", 2, 0)
    status, body = http_post(server.url + "/v1/adapters",
                             json.dumps({"name": "wrong", "path": str(tmp_path / "wrong")}).encode())
    assert status == 400 and "does not load" in body["error"]["message"] and "another base model" in \
        body["error"]["message"]
    status, body = http_post(server.url + "/v1/adapters", json.dumps({"name": "x"}).encode())
    assert status == 400 and body["error"]["param"] == "path"
    assert served.adapters.names() == ["alpha"]


# ---- real weights ---------------------------------------------------------------------------------------------


def save_random_adapter(model: torch.nn.Module, name: str, directory, seed: int):  # noqa: ANN001, ANN201
    """A rank-8 LoRA on q,k,v,o with random non-zero B, saved from `model` itself (a deep copy of a 135M model per
    adapter would cost seconds) and removed from it again."""
    from llmkit.peft.core import save_adapter
    from llmkit.peft.lora import LoraSettings, add_adapter, apply_lora, lora_layers, set_adapter
    from llmkit.peft.multi_lora import remove_lora_adapter

    settings = LoraSettings(rank=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"), adapter_name=name)
    (add_adapter if lora_layers(model) else apply_lora)(model, settings)
    set_adapter(model, name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for table in (layer.lora_A, layer.lora_B):
                table[name].copy_(torch.randn(table[name].shape, generator=generator) * 0.05)
    save_adapter(model, directory, "lora", settings)
    remove_lora_adapter(model, name)
    return directory


@pytest.mark.slow
def test_smollm2_mixed_batch_equals_each_adapter_merged(tmp_path):
    """SmolLM2-135M (fp32, dequantized from the GGUF) with two rank-8 adapters on q,k,v,o: a decode batch that mixes
    both and the base gives each request the greedy tokens of its adapter merged into the weights."""
    from llmkit.checkpoints import default_model_path, load_tokenizer
    from llmkit.commands.common import load_decoder
    from llmkit.peft.lora import set_adapter, unmerge_lora
    from llmkit.peft.multi_lora import load_lora_adapter, remove_lora_adapter

    path = default_model_path()
    model = load_decoder(path, weights="float")
    tokenizer = load_tokenizer(path)
    paths = {name: save_random_adapter(model, name, tmp_path / name, seed) for seed, name in enumerate(("one", "two"))}
    texts = ["The capital of France is", "Water boils at a temperature of", "The capital of France is"]
    prompts = [tokenizer.encode(text) for text in texts]
    wanted = ["one", None, "two"]
    expected = []
    for prompt, name in zip(prompts, wanted):
        if name is None:
            expected.append(alone(model, prompt))
            continue
        load_lora_adapter(model, name, paths[name])  # the reference: this adapter alone, merged into the weights
        merge_lora(set_adapter(model, name))
        expected.append(alone(model, prompt))
        remove_lora_adapter(unmerge_lora(model), name)
    engine = Engine(model, adapters=AdapterRegistry(model, paths, 2), max_batch_size=4)
    handles = [engine.submit(Request(prompt, NEW_TOKENS, adapter=name)) for prompt, name in zip(prompts, wanted)]
    run_to_end(engine)
    assert [tokens_of(list(handle.events(timeout=5))) for handle in handles] == expected
    assert expected[0] != expected[2]  # same prompt, two adapters, two answers


def test_serve_command_checks_adapters_before_loading(capsys, tmp_path):
    from tests.helpers import cli_status

    code, err = cli_status(capsys, "serve", "--adapters", "[runs/sql/adapter]")
    assert code == 2 and "--adapters entry 'runs/sql/adapter' is not NAME=DIRECTORY" in err
    code, err = cli_status(capsys, "serve", "--adapters", f"[sql={tmp_path / 'missing'}]")
    assert code == 2 and "is not a directory" in err
    code, err = cli_status(capsys, "serve", "--max_loaded_adapters", "0", "--adapters", "[]")
    assert code == 2 and "--max_loaded_adapters 0 must be at least 1" in err


# ---- adapters that fail when they are lazily loaded (issue 13/16) -----------------------------------------------


def broken_copies(paths: dict, root) -> dict:  # noqa: ANN001
    """Adapter directories that pass the start-time check (a LoRA adapter_config.json) and fail at load: `gone`
    (deleted after the server starts: the caller removes it), `corrupt` (its weights file overwritten with garbage)
    and `wrong` (saved from another base model's shapes)."""
    import shutil

    from llmkit.peft.core import ADAPTER_WEIGHTS_FILE

    gone = shutil.copytree(paths["beta"], root / "gone")
    corrupt = shutil.copytree(paths["beta"], root / "corrupt")
    (corrupt / ADAPTER_WEIGHTS_FILE).write_bytes(b"\x13" * 64)
    wrong = random_lora_dir(tiny_decoder(d_model=32, n_heads=2, n_kv_heads=1), root / "wrong", 2, 0)
    return {"gone": gone, "corrupt": corrupt, "wrong": wrong}


def test_an_adapter_deleted_between_submit_and_admission_ends_only_its_request(setup, tmp_path):
    import shutil

    from llmkit.peft.multi_lora import adapter_names
    from llmkit.serve.adapters import AdapterLoadError

    _, paths, merged = setup
    engine, registry = engine_for(setup, max_loaded=1)
    registry.add("gone", broken_copies(paths, tmp_path)["gone"])
    prompt = random_prompt(6, seed=4)
    failing = engine.submit(Request(prompt, NEW_TOKENS, adapter="gone"))  # its directory is still there now
    others = [engine.submit(Request(prompt, NEW_TOKENS, adapter=name)) for name in ("alpha", None)]
    shutil.rmtree(tmp_path / "gone")
    run_to_end(engine)
    (event,) = list(failing.events(timeout=5))
    assert event.finish_reason == "error" and isinstance(event.cause, AdapterLoadError) and event.cause.missing
    assert "adapter 'gone' cannot be loaded: its directory" in event.error and "no longer exists" in event.error
    assert [tokens_of(list(handle.events(timeout=5))) for handle in others] == \
        [alone(merged["alpha"], prompt), alone(merged[None], prompt)]
    assert registry.loaded() == ["alpha"] and "gone" not in adapter_names(engine.model)
    with pytest.raises(AdapterLoadError, match=r"adapter 'gone' cannot be loaded: its directory .* no longer exists"):
        engine.submit(Request(prompt, NEW_TOKENS, adapter="gone"))  # refused at once from now on


def test_http_adapter_failing_to_load_is_a_4xx_envelope_and_the_server_goes_on(setup, tmp_path):
    import shutil

    from llmkit.peft.multi_lora import adapter_names

    base, paths, merged = setup
    broken = broken_copies(paths, tmp_path)
    tokenizer = byte_tokenizer()
    served = start_engine(copy.deepcopy(base), tokenizer, "tiny", adapters={"alpha": paths["alpha"], **broken},
                          max_loaded_adapters=2, max_batch_size=4)
    shutil.rmtree(broken["gone"])
    app = create_app(api_key=API_KEY)
    app.state.llmkit.attach(served)
    server = ServerThread(app)
    try:
        wait_until(lambda: http_get(server.url + "/health")[0] == 200, "the model to load")
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
        prompt = "The king said"
        with pytest.raises(openai.NotFoundError) as error:  # 404: the directory is gone
            client.completions.create(model="gone", prompt=prompt, max_tokens=NEW_TOKENS)
        assert error.value.code == "model_not_found" and error.value.param == "model"
        assert "adapter 'gone' cannot be loaded: its directory" in error.value.message
        for name, reason in (("corrupt", "adapter.safetensors is missing or unreadable"),
                             ("wrong", "another base model")):
            for _ in range(2):  # and again: nothing of the first failure stayed behind
                with pytest.raises(openai.BadRequestError) as error:  # 400: its files do not load
                    client.completions.create(model=f"tiny:{name}", prompt=prompt, max_tokens=NEW_TOKENS)
                assert error.value.status_code == 400 and error.value.code == "invalid_value", name
                assert f"adapter '{name}' from {broken[name]} does not load:" in error.value.message, name
                assert reason in error.value.message, error.value.message
        stream = client.chat.completions.create(model="corrupt", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=NEW_TOKENS, stream=True)
        with pytest.raises(openai.APIError, match=r"adapter 'corrupt' from .* does not load"):
            list(stream)  # streamed: the headers went out already; the envelope comes as the stream's event
        assert sorted(served.adapters.loaded()) == [] and adapter_names(served.engine.model) == []
        ids = tokenizer.encode(prompt)
        for model, reference in (("alpha", merged["alpha"]), ("tiny", merged[None])):  # still serving
            reply = client.completions.create(model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0)
            assert reply.choices[0].text == tokenizer.decode(alone(reference, ids)), model
        assert served.adapters.loaded() == ["alpha"]
    finally:
        server.stop()
