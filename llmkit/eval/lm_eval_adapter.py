"""lm-evaluation-harness adapter: run any of lm-eval's tasks on a model llmkit loads (GGUF, HF directory, llmkit dir).

lm_eval 0.4.13 finds models only in its own registry (it has no plugin discovery), so this module registers
`LlmkitLM` as "llmkit" when imported and its `main()` runs lm-eval's own command line after that import:

    python -m llmkit.eval.lm_eval_adapter --model llmkit --model_args pretrained=PATH,dtype=float32 \\
        --tasks hellaswag --batch_size 8 --limit 100

Every `lm_eval` flag works (`--include_path DIR` for local task YAMLs, `--num_fewshot`, `--output_path`, ...);
without `pretrained` the default model (SmolLM2-135M-Instruct GGUF) is used. From Python:

    import lm_eval
    from llmkit.eval.lm_eval_adapter import LlmkitLM
    lm_eval.simple_evaluate(model=LlmkitLM(model=model, tokenizer=tokenizer), tasks=["hellaswag"])

The three request kinds map onto llmkit: `loglikelihood` -> `llmkit.eval.scoring.continuation_logprobs`,
`loglikelihood_rolling` -> lm-eval's own disjoint rolling windows (context_len=1) of every text, scored together
by `llmkit.eval.scoring.score_token_pairs` (the same figure as `scoring.rolling_loglikelihood`),
`generate_until` -> `llmkit.generate.generate` with the request's stop strings, batched by equal settings.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from lm_eval import utils as lm_eval_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from llmkit.checkpoints import default_model_path, load_model, load_tokenizer
from llmkit.device import resolve_device
from llmkit.errors import LlmkitError
from llmkit.eval.scoring import continuation_logprobs, score_token_pairs
from llmkit.generate import SamplingSettings, generate
from llmkit.models.decoder import Decoder
from llmkit.tokenizer import Tokenizer

MODEL_NAME = "llmkit"  # the name lm-eval's --model takes
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256  # as lm-eval's HFLM
# generate_until gen_kwargs: lm-eval's names for the token limit (first given wins), then SamplingSettings' fields.
MAX_TOKENS_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty", "seed")
HANDLED_GEN_KEYS = {"do_sample", "until", *MAX_TOKENS_KEYS, *SAMPLING_KEYS}


@register_model(MODEL_NAME)
class LlmkitLM(LM):
    """lm-eval's `LM` over an llmkit Decoder and Tokenizer (loaded from `pretrained`, or passed in)."""

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str = "float32",  # float32 | bfloat16 | float16
        device: str = "auto",
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        max_batch_size: int | None = None,
        model: Decoder | None = None,
        tokenizer: Tokenizer | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise LlmkitError(
                f"unknown llmkit model_args {sorted(unknown)}; accepted: pretrained, dtype, device, batch_size, "
                "max_length, max_gen_toks"
            )
        if max_batch_size is not None:
            raise LlmkitError(
                f"max_batch_size={max_batch_size} only applies to batch_size=auto, which llmkit does not support; "
                "drop --max_batch_size and pass --batch_size N"
            )
        if model is not None or tokenizer is not None:
            if model is None or tokenizer is None or pretrained is not None:
                raise LlmkitError("pass either pretrained=PATH, or both model= and tokenizer= (not a mix)")
            self.model, self.tokenizer = model, tokenizer
        else:
            path = pretrained if pretrained is not None else default_model_path()
            self.model = load_model(path, dtype=dtype, device=str(resolve_device(device)), arch="decoder")
            self.tokenizer = load_tokenizer(path)
        self.model.eval()
        self._device = next(self.model.parameters()).device
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        context = self.model.config.max_seq_len
        self.max_length = context if max_length is None else _positive_int("max_length", max_length)
        if self.max_length > context:
            raise LlmkitError(
                f"max_length={self.max_length:,} is longer than {self.model.config.name}'s context of {context:,} "
                f"tokens; pass max_length <= {context:,} or leave it out"
            )

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LlmkitLM:
        """Build from lm-eval's `--model_args key=value,...`; a key given there wins over the CLI's defaults."""
        return cls.create_from_arg_obj(lm_eval_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> LlmkitLM:
        # lm-eval always passes --batch_size (default 1) here: an explicit model_args batch_size takes precedence.
        extra = {key: value for key, value in (additional_config or {}).items() if value is not None}
        return cls(**{**extra, **arg_dict})

    # ---- what lm-eval reads ------------------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return self.model.config.name

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records about the model in its results file."""
        return {
            "model_name": self.model.config.name,
            "model_num_parameters": sum(parameter.numel() for parameter in self.model.parameters()),
            "model_dtype": str(next(self.model.parameters()).dtype),
        }

    @property
    def prefix_token_id(self) -> int:
        """Token the first scored token of a rolling text is conditioned on: BOS, else EOS (as lm-eval's HFLM)."""
        for token_id in (self.tokenizer.bos_id, self.tokenizer.eos_id):
            if token_id is not None:
                return token_id
        raise LlmkitError(
            f"{self.model.config.name}'s tokenizer has neither BOS nor EOS, so loglikelihood_rolling has no token to "
            "condition the first token on; use a tokenizer with an EOS token"
        )

    # ---- the three request kinds -------------------------------------------------------------------------------

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives the continuation) per request."""
        pairs = [(context, continuation) for context, continuation in (request.args for request in requests)]
        scores = continuation_logprobs(self.model, self.tokenizer, pairs, self.batch_size, progress=not disable_tqdm)
        results = [(score.logprob, score.is_greedy) for score in scores]
        for pair, result in zip(pairs, results):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """log p(text) of whole texts, each token scored once in lm-eval's disjoint windows of max_length tokens."""
        pairs: list[tuple[list[int], list[int]]] = []  # (context ids, scored ids) of every window of every text
        owners: list[int] = []  # the request each window belongs to
        for index, (text,) in enumerate(request.args for request in requests):
            ids = self.tokenizer.encode(text, add_bos=False)
            windows = lm_eval_utils.get_rolling_token_windows(ids, self.prefix_token_id, self.max_length, context_len=1)
            for context, scored in map(lm_eval_utils.make_disjoint_window, windows):
                pairs.append((context, scored))
                owners.append(index)
        totals = [0.0] * len(requests)  # an empty text has no tokens: log p = 0, as in lm-eval
        for owner, (logprob, _) in zip(owners, score_token_pairs(self.model, pairs, self.batch_size, not disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Continue each context until one of its `until` strings, EOS, or `max_gen_toks` new tokens."""
        groups: dict[str, list[int]] = {}  # requests with equal generation settings share batches
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        outputs: list[str] = [""] * len(requests)
        progress = tqdm(total=len(requests), desc="llmkit generate_until", disable=disable_tqdm)
        for indices in groups.values():
            max_new_tokens, settings, stop_strings = self._generation_settings(requests[indices[0]].args[1])
            # Longest prompts first, so each batch pads little.
            indices = sorted(indices, key=lambda i: -len(self.tokenizer.encode(requests[i].args[0])))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                texts = generate(
                    self.model, self.tokenizer, [requests[i].args[0] for i in batch], max_new_tokens, settings,
                    stop_strings, truncate_prompt=True,
                )  # fmt: skip
                for index, text in zip(batch, texts):
                    outputs[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
                progress.update(len(batch))
        progress.close()
        return outputs

    # ---- helpers -----------------------------------------------------------------------------------------------

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[int, SamplingSettings, list[str]]:
        """max_new_tokens, sampling settings and stop strings from one request's lm-eval gen_kwargs."""
        if not isinstance(gen_kwargs, dict):
            raise LlmkitError(f"generate_until gen_kwargs must be a dict, got {gen_kwargs!r}; fix the task's YAML")
        kwargs = dict(gen_kwargs)
        unsupported = sorted(set(kwargs) - HANDLED_GEN_KEYS)
        if unsupported:
            raise LlmkitError(
                f"generation_kwargs {unsupported} are not supported by llmkit; supported: "
                f"{', '.join(sorted(HANDLED_GEN_KEYS))}: remove them from the task's generation_kwargs / --gen_kwargs"
            )
        until = kwargs.pop("until", None) or []
        stop_strings = [stop for stop in ([until] if isinstance(until, str) else until) if stop]  # "" means no stop
        limits = [kwargs.pop(key, None) for key in MAX_TOKENS_KEYS]
        max_new_tokens = next((limit for limit in limits if limit is not None), self.max_gen_toks)
        do_sample = kwargs.pop("do_sample", None)
        if do_sample is False:  # greedy, whatever the temperature says (lm-eval's rule)
            kwargs["temperature"] = 0.0
        elif do_sample and not kwargs.get("temperature", 1.0):
            raise LlmkitError("generation_kwargs ask for do_sample=True with temperature=0; set temperature > 0 to "
                              "sample, or do_sample=False for greedy decoding")  # fmt: skip
        elif do_sample:
            kwargs.setdefault("temperature", 1.0)  # sampling with no temperature given: plain softmax, as transformers
        return _positive_int("max_gen_toks", max_new_tokens), SamplingSettings(**kwargs), stop_strings


def _positive_int(name: str, value: int | str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(value).strip() != str(number):
        hint = " (llmkit has no batch_size=auto)" if name == "batch_size" else ""
        raise LlmkitError(f"{name}={value!r} must be a positive integer{hint}; pass e.g. {name}=8")
    return number


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line (`lm_eval ...` arguments) with the "llmkit" model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
