"""`llmkit serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine."""

from __future__ import annotations

import errno
import socket
import sys
import threading
from pathlib import Path

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
    dtype: Dtype = "float32",
    device: Device = "auto",
) -> None:
    """Serve a model over the OpenAI API: any `openai` client, curl, or a browser at http://HOST:PORT/ (a chat page).

    Example: llmkit serve                                   (SmolLM2-135M-Instruct on http://127.0.0.1:8000)
             llmkit serve --model my_model/ --port 8080 --api_key secret --max_batch_size 16
             curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
                  -d '{"model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "Hi"}]}'

    Routes: POST /v1/chat/completions and /v1/completions (streaming, n, stop, seed, logprobs, response_format
    json_object / json_schema), GET /v1/models, /health (503 until the model is loaded), /metrics (Prometheus,
    vLLM's metric names). Ctrl-C or SIGTERM stops accepting requests, finishes those in flight, and exits 0.

    Args:
        model: .gguf file, Hugging Face directory or llmkit directory (default: SmolLM2-135M-Instruct). Clients name
            it by its file name without .gguf (or its directory's name), as GET /v1/models lists it.
        host: address to listen on (0.0.0.0 for every interface).
        port: TCP port to listen on.
        api_key: when set, every /v1 request must send `Authorization: Bearer API_KEY`.
        max_batch_size: most requests decoded together in one step (continuous batching).
        max_queue: most requests waiting for a batch slot; more get HTTP 429.
        kv_cache_tokens: KV-cache size in tokens, shared by all running requests (default: max_batch_size x context).
        dtype: weights' dtype (bfloat16 halves memory; float32 is fastest on most CPUs).
        device: auto, cpu, cuda or cuda:N.
    """
    import uvicorn

    from llmkit.checkpoints import load_tokenizer
    from llmkit.commands.common import load_decoder
    from llmkit.serve.http import create_app, start_engine

    for flag, value in (("--max_batch_size", max_batch_size), ("--max_queue", max_queue)):
        if value < 1:
            raise LlmkitError(f"{flag} {value} must be at least 1")
    if kv_cache_tokens is not None and kv_cache_tokens < 1:
        raise LlmkitError(f"--kv_cache_tokens {kv_cache_tokens} must be at least 1 (or left out for the default)")
    path = model_path(model)
    if not path.exists():
        raise LlmkitError(f"--model {path} does not exist; pass a .gguf file or a model directory")
    check_address(host, port)
    name = served_name(path)

    def load():  # noqa: ANN202 (a ServedModel)
        llm = load_decoder(path, dtype, device)
        return start_engine(llm, load_tokenizer(path), name, max_batch_size=max_batch_size, max_queue=max_queue,
                            kv_cache_tokens=kv_cache_tokens)

    app = create_app(load, api_key=api_key)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    shown = f"[{host}]" if ":" in host else host
    print(f"llmkit serve: loading {name} from {path}; http://{shown}:{port}/ answers /health with 503 until it is ready",
          file=sys.stderr)
    threading.Thread(target=_report_loading, args=(app, server, shown, port, name), daemon=True).start()
    _run_until_signal(server)
    error = app.state.llmkit["error"]
    if error is not None:
        raise error if isinstance(error, LlmkitError) else LlmkitError(f"loading {path} failed: {error}")


def _report_loading(app, server, host: str, port: int, name: str) -> None:  # noqa: ANN001 (FastAPI, uvicorn.Server)
    """Print the URL once the model is served; stop the server if loading failed (`serve` then reports the error)."""
    loader = None
    while loader is None and not server.should_exit:
        loader = getattr(app.state, "loader", None)
        threading.Event().wait(0.05)
    if loader is None:
        return
    loader.join()
    if app.state.llmkit["error"] is not None:
        server.should_exit = True
        return
    print(f"llmkit serve: {name} ready at http://{host}:{port}/ (OpenAI API under /v1; Ctrl-C stops)", flush=True)


def _run_until_signal(server) -> None:  # noqa: ANN001 (uvicorn.Server)
    """Run uvicorn in this thread. It handles SIGINT/SIGTERM itself (stop accepting, finish in-flight requests, shut
    the engine down), then re-raises the signal it caught to the handlers it found: no-op handlers installed here turn
    that into a normal return, so the command exits 0."""
    import signal

    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
