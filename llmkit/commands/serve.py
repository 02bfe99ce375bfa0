"""`llmkit serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine."""

from __future__ import annotations

import errno
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from llmkit.commands.common import Device, Dtype, model_path
from llmkit.errors import LlmkitError


def served_name(path: Path) -> str:
    """The model id clients send: the file's name without .gguf, or the directory's name."""
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def check_address(host: str, port: int) -> None:
    """One clear error, before any model loads, when the address cannot be listened on."""
    if not 0 < port < 65536:
        raise LlmkitError(f"--port {port} is not a TCP port; use 1-65535, e.g. 8000")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise LlmkitError(f"--host {host} does not resolve ({error.strerror}); use e.g. 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise LlmkitError(f"--port {port} on {host} is already in use; pass another --port") from None
            raise LlmkitError(f"cannot listen on {host}:{port} ({error.strerror}); pass another --host or --port") from None


def serve(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch_size: int = 8,
    max_queue: int = 64,
    kv_cache_tokens: int | None = None,
    kv_cache_dtype: Dtype | None = None,
    int8_prefill: bool = False,
    adapters: list[str] | None = None,
    max_loaded_adapters: int = 4,
    dtype: Dtype = "float32",
    device: Device = "auto",
    cascade: str | None = None,
    draft: str | None = None,
    speculate: Literal["ngram"] | None = None,
    num_speculative_tokens: int = 5,
) -> None:
    """Serve a model over the OpenAI API: any `openai` client, curl, or a browser at http://HOST:PORT/ (a chat page).

    Example: llmkit serve                                   (SmolLM2-135M-Instruct on http://127.0.0.1:8000)
             llmkit serve --model my_model/ --port 8080 --api_key secret --max_batch_size 16
             llmkit serve --adapters "[summarize=runs/sum/adapter, sql=runs/sql/adapter]" --max_loaded_adapters 2
             llmkit serve --speculate ngram --num_speculative_tokens 5   (prompt lookup decoding in every batch)
             llmkit serve --model big/ --draft small/ --num_speculative_tokens 4   (a draft model proposes)
             curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
                  -d '{"model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "Hi"}]}'

    Routes: POST /v1/chat/completions and /v1/completions (streaming, n, stop, seed, logprobs, response_format
    json_object / json_schema), GET /v1/models, /health (503 until the model is loaded), /metrics (Prometheus,
    vLLM's metric names). Ctrl-C or SIGTERM stops accepting requests, finishes those in flight, and exits 0.

    LoRA adapters (with --adapters): a request's "model" picks one by name ("summarize", or "BASE:summarize"), the
    base's own name runs the base; requests for different adapters share one decode batch over one copy of the base
    weights. POST /v1/adapters {"name": ..., "path": ...} loads another at run time, DELETE /v1/adapters/NAME unloads
    one; GET /v1/models lists the base and its adapters.

    Args:
        model: .gguf file, Hugging Face directory or llmkit directory (default: SmolLM2-135M-Instruct). Clients name
            it by its file name without .gguf (or its directory's name), as GET /v1/models lists it.
        host: address to listen on (0.0.0.0 for every interface).
        port: TCP port to listen on.
        api_key: when set, every /v1 request must send `Authorization: Bearer API_KEY`.
        max_batch_size: most requests decoded together in one step (continuous batching).
        max_queue: most requests waiting for a batch slot; more get HTTP 429.
        kv_cache_tokens: KV-cache size in tokens, shared by all running requests (default: max_batch_size x context).
        kv_cache_dtype: dtype of the KV cache (default: float16 for a GGUF file at --dtype float32, as llama.cpp
            keeps it; else --dtype's). float16 and bfloat16 halve its memory and the bytes each token reads, and
            move the logits by their rounding of keys and values; float32 keeps them exact; bfloat16 attention runs
            in bfloat16 on CPUs with AVX512-BF16/AMX (2-3x faster there).
        int8_prefill: run prompts through Q4_0/Q4_1/Q8_0 layers with int8 activations, as llama.cpp does: 1.1-1.3x
            faster prefill, answers as llama.cpp's (see `llmkit chat --help`).
        adapters: LoRA adapters to serve on the base, as NAME=DIRECTORY (llmkit finetune's OUTPUT/adapter or a PEFT
            LoRA directory); loaded at their first request. "[]" serves none yet but allows POST /v1/adapters.
        max_loaded_adapters: most adapters loaded at once; the least recently used idle one is unloaded for another.
        dtype: weights' dtype (bfloat16 halves memory; float32 is fastest on most CPUs).
        device: auto, cpu, cuda or cuda:N.
        cascade: a fitted cascade (the cascade.json `llmkit cascade` writes): requests for the model "cascade" run its
            stages in order and report which stage answered and the cost (docs/cascade.md).
        draft: speculative decoding inside the batch with this draft model (same tokenizer as --model, loaded like
            it, on its device): it proposes tokens for each request from its own KV cache, one forward of --model
            checks them (greedy output unchanged, sampling distributed as without it). Requests with a JSON schema,
            logprobs or penalties, or too long for the draft's context, decode one token per step as without it.
        speculate: ngram: speculative decoding by prompt lookup inside the batch: each request proposes the tokens
            that followed its last 3 tokens earlier in its prompt or output, one forward checks them (greedy output
            unchanged, sampling distributed as without it). Requests with a JSON schema, logprobs or penalties decode
            one token per step as without it. /metrics counts proposed and accepted tokens.
        num_speculative_tokens: most tokens a request proposes per step with --draft or --speculate.
    """
    import uvicorn

    from llmkit.checkpoints import load_tokenizer
    from llmkit.commands.chat import _draft_model
    from llmkit.commands.common import load_decoder
    from llmkit.serve.http import create_app, start_engine
    from llmkit.serve.speculation import check_speculation

    for flag, value in (("--max_batch_size", max_batch_size), ("--max_queue", max_queue)):
        if value < 1:
            raise LlmkitError(f"{flag} {value} must be at least 1")
    if max_loaded_adapters < 1:
        raise LlmkitError(f"--max_loaded_adapters {max_loaded_adapters} must be at least 1")
    named_adapters = None if adapters is None else parse_adapters(adapters)
    check_speculation(speculate, num_speculative_tokens, draft)
    if kv_cache_tokens is not None and kv_cache_tokens < 1:
        raise LlmkitError(f"--kv_cache_tokens {kv_cache_tokens} must be at least 1 (or left out for the default)")
    path = model_path(model)
    if not path.exists():
        raise LlmkitError(f"--model {path} does not exist; pass a .gguf file or a model directory")
    if draft is not None and not model_path(draft).exists():
        raise LlmkitError(f"--draft {draft} does not exist; pass a .gguf file or a model directory")
    check_address(host, port)
    name = served_name(path)
    app = create_app(api_key=api_key)
    served_app = app if cascade is None else _with_cascade(app, cascade, api_key, dtype, device)
    server = uvicorn.Server(uvicorn.Config(served_app, host=host, port=port, log_level="warning", access_log=False))
    shown = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    with _stop_on_signals(server, app.state.llmkit):
        # uvicorn answers (/health: 503) from its own thread while this one loads the model: a model loaded in
        # another thread ran 40x slower afterwards (see ServerState).
        thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
        thread.start()
        print(f"llmkit serve: loading {name} from {path}; {shown} answers /health with 503 until it is ready",
              file=sys.stderr, flush=True)
        try:
            llm = load_decoder(path, dtype, device, kv_cache_dtype=kv_cache_dtype, int8_prefill=int8_prefill)
            tokenizer = load_tokenizer(path)
            draft_model = None if draft is None else _draft_model(draft, tokenizer, llm, dtype)
            served = start_engine(llm, tokenizer, name, start=False, draft=draft_model,
                                  adapters=named_adapters, max_loaded_adapters=max_loaded_adapters,
                                  max_batch_size=max_batch_size, max_queue=max_queue, kv_cache_tokens=kv_cache_tokens,
                                  speculate=speculate, num_speculative_tokens=num_speculative_tokens)
        except BaseException as error:
            app.state.llmkit.fail(error)
            server.should_exit = True
            thread.join()
            raise
        app.state.llmkit.attach(served)  # uvicorn shuts the engine down when it stops
        if not server.should_exit:
            print(f"llmkit serve: {name} ready at {shown} (OpenAI API under /v1; Ctrl-C stops)", flush=True)
            # The engine steps on this (main) thread: torch's CPU ops ran ~3x slower from another thread
            # (Engine.run). It returns once uvicorn, stopping, has shut the engine down and in-flight requests ended.
            threading.Thread(target=lambda: (thread.join(), served.engine.shutdown()), daemon=True).start()  # uvicorn gone
            served.engine.run()
        while thread.is_alive():
            thread.join(0.5)  # short waits, so the signal handlers run in this thread


def _with_cascade(app, cascade: str, api_key: str | None, dtype: str, device: str):  # noqa: ANN001, ANN202 (ASGI apps)
    """`app` answering the model "cascade" with the fitted cascade file `cascade` (its models loaded here, in the
    main thread)."""
    from llmkit.checkpoints import load_tokenizer
    from llmkit.commands.common import load_decoder
    from llmkit.serve.cascade_http import load_cascade, with_cascade

    fitted = load_cascade(cascade, lambda path: (load_decoder(path, dtype, device), load_tokenizer(path)))
    return with_cascade(app, fitted, api_key)


def parse_adapters(entries: list[str] | str) -> dict[str, str]:
    """--adapters NAME=DIRECTORY entries as {name: directory}; each directory checked to be a LoRA adapter now,
    before the model loads."""
    from llmkit.peft.multi_lora import check_lora_adapter_dir

    named: dict[str, str] = {}
    for entry in [entries] if isinstance(entries, str) else entries:
        name, sep, directory = entry.partition("=")
        name, directory = name.strip(), directory.strip()
        if not sep or not name.isidentifier() or not directory:
            raise LlmkitError(f"--adapters entry {entry!r} is not NAME=DIRECTORY (NAME: letters, digits, _); "
                              "e.g. summarize=runs/finetune/adapter")
        if name in named:
            raise LlmkitError(f"--adapters names {name!r} twice; give each adapter its own name")
        check_lora_adapter_dir(directory)
        named[name] = directory
    return named


@contextmanager
def _stop_on_signals(server, state) -> Iterator[None]:  # noqa: ANN001 (uvicorn.Server, ServerState)
    """SIGINT/SIGTERM ask uvicorn to stop: it stops accepting connections, lets the requests in flight finish, then
    shuts the engine down; the command returns normally (exit 0). A second SIGINT stops at once; a signal while the
    model still loads interrupts the load (exit status 130, or 143 for SIGTERM)."""
    import signal

    def stop(signum: int, frame: object) -> None:
        if state.served is None and state.error is None:
            interrupt = KeyboardInterrupt()
            interrupt.exit_status = 128 + signum
            raise interrupt
        if server.should_exit and signum == signal.SIGINT:
            server.force_exit = True
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
