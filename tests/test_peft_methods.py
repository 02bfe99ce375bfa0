"""IA3, prompt tuning, prefix tuning and bottleneck adapters: parity with peft on a tiny random Llama, peft adapter
directories in both directions, merge, gradients, generation with a KV cache, and every error message."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import IA3Config, PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llmkit.checkpoints.hf import load_hf
from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.generate import generate_tokens
from llmkit.models.decoder import Decoder
from llmkit.models.encoder import Encoder
from llmkit.peft.adapters import AdapterSettings, apply_adapters
from llmkit.peft.core import save_adapter
from llmkit.peft.hf_peft_other import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, export_peft_adapter, import_peft_adapter
from llmkit.peft.ia3 import IA3Settings, apply_ia3, ia3_layers, merge_ia3, unmerge_ia3
from llmkit.peft.prefix_tuning import PrefixTuningSettings, apply_prefix_tuning, merge_prefix_tuning
from llmkit.peft.prompt_tuning import PromptTuningSettings, apply_prompt_tuning
from llmkit.peft.registry import METHODS, apply_method, load_adapter
from llmkit.tokenizer import Tokenizer
from llmkit.train.objectives import causal_lm_batch, causal_lm_loss

VOCAB, P = 96, 5
HF_CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                 rope_parameters={"rope_type": "default", "rope_theta": 500.0}, attn_implementation="eager")
# fp32 on both sides: only summation order differs (~1e-6 here), while a wrong prefix layout, position offset or
# scaled dimension moves logits by 1e-2 or more.
TOLERANCE = 1e-5
HF_TO_LLMKIT = {"self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj", "mlp.down_proj": "mlp.down_proj"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (grouped-query attention) saved as a Hugging Face directory, weights far from HF's init."""
    directory = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**HF_CONFIG))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
    model.save_pretrained(directory)
    return directory


def hf_model(base_dir: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()  # fresh: peft edits it in place


def llmkit_model(base_dir: Path) -> Decoder:
    config, state = load_hf(base_dir)
    model = Decoder(config)
    model.load_state_dict(state)
    return model.eval()


def ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits_of(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)


def peft_logits(model: PeftModel, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= TOLERANCE


def peft_ia3(base_dir: Path) -> PeftModel:
    """peft's IA3 with vectors far from ones, so every scaled dimension shows in the logits."""
    model = get_peft_model(hf_model(base_dir), IA3Config(task_type=TaskType.CAUSAL_LM)).eval()
    torch.manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "ia3_l" in name:
                parameter.copy_(1 + 0.5 * torch.randn_like(parameter))
    return model


def peft_prompt_tuning(base_dir: Path) -> PeftModel:
    model = get_peft_model(hf_model(base_dir), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P))
    torch.manual_seed(3)
    with torch.no_grad():
        model.prompt_encoder.default.embedding.weight.normal_(std=0.5)
    return model.eval()


def peft_prefix_tuning(base_dir: Path, reparameterize: bool) -> PeftModel:
    config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P, prefix_projection=reparameterize,
                                encoder_hidden_size=24)
    return get_peft_model(hf_model(base_dir), config).eval()


# --------------------------------------------------------------------------- parity with peft (same weights)


def test_ia3_matches_peft(base_dir):
    reference = peft_ia3(base_dir)
    model = apply_ia3(llmkit_model(base_dir), IA3Settings())
    layers = ia3_layers(model)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "ia3_l" in name:  # base_model.model.model.layers.{i}.<hf module>.ia3_l.default, (out, 1) or (1, in)
                layer, hf_module = name.split("layers.")[1].removesuffix(".ia3_l.default").split(".", 1)
                layers[f"blocks.{layer}.{HF_TO_LLMKIT[hf_module]}"].ia3_scale.copy_(parameter.flatten())
    tokens = ids()
    assert (logits_of(model, tokens) - logits_of(apply_ia3(llmkit_model(base_dir)), tokens)).abs().max() > 1e-2
    assert close(logits_of(model, tokens), peft_logits(reference, tokens))


def test_prompt_tuning_matches_peft_logits_and_loss(base_dir):
    reference = peft_prompt_tuning(base_dir)
    model = apply_prompt_tuning(llmkit_model(base_dir), PromptTuningSettings(n_virtual_tokens=P))
    model.soft_prompt.load_state_dict(reference.prompt_encoder.default.state_dict())
    tokens = ids()
    expected = peft_logits(reference, tokens)  # (B, P + T, V): peft returns the soft prompt's positions too
    assert expected.shape[1] == P + tokens.shape[1]
    assert close(logits_of(model, tokens), expected[:, P:])
    # peft labels the soft prompt -100 but scores the first token from it; llmkit's unchanged objective has no
    # logit before the first token, so the first label is dropped on peft's side to compare the same terms.
    labels = tokens.clone()
    labels[:, 0] = -100
    with torch.no_grad():
        assert abs(causal_lm_loss(model, causal_lm_batch(tokens)).mean() - reference(input_ids=tokens, labels=labels).loss) \
            <= TOLERANCE


def test_prompt_tuning_text_init_matches_peft(base_dir, tmp_path):
    words = ["classify", "the", "review", ":"]
    backend = BackendTokenizer(models.WordLevel({word: 10 + i for i, word in enumerate(words)}, unk_token=":"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path)
    text = "classify the review :"  # 4 tokens, repeated then cut to 7
    reference = get_peft_model(hf_model(base_dir), PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(tmp_path)))
    model = apply_prompt_tuning(llmkit_model(base_dir), PromptTuningSettings(7, "text", text), Tokenizer(backend))
    assert torch.equal(model.soft_prompt.embedding.weight, reference.prompt_encoder.default.embedding.weight)
    assert torch.equal(model.soft_prompt.embedding.weight[4], model.embed.weight[10])  # the 5th is the 1st again


@pytest.mark.parametrize("reparameterize", [True, False])
def test_prefix_tuning_matches_peft(base_dir, reparameterize):
    reference = peft_prefix_tuning(base_dir, reparameterize)
    settings = PrefixTuningSettings(n_virtual_tokens=P, reparameterize=reparameterize, hidden=24)
    model = apply_prefix_tuning(llmkit_model(base_dir), settings)
    model.kv_prefix.load_state_dict(reference.prompt_encoder.default.state_dict())  # peft's names: embedding, transform
    tokens = ids()
    expected = peft_logits(reference, tokens)
    assert (expected - logits_of(llmkit_model(base_dir), tokens)).abs().max() > 1e-2  # the prefix changes the logits
    assert close(logits_of(model, tokens), expected)
    folded = logits_of(merge_prefix_tuning(model), tokens)  # the MLP evaluated once, a plain prefix kept
    assert model.kv_prefix.transform is None and not model.kv_prefix.settings.reparameterize
    assert close(folded, expected)


# --------------------------------------------------------------------------- peft adapter directories, both ways


def llmkit_with(method: str, base_dir: Path) -> Decoder:
    """An llmkit model with `method` applied and its trainable part set away from the start values."""
    model = llmkit_model(base_dir)
    torch.manual_seed(4)
    if method == "ia3":
        apply_ia3(model)
    elif method == "prompt":
        apply_prompt_tuning(model, PromptTuningSettings(n_virtual_tokens=P))
    else:
        apply_prefix_tuning(model, PrefixTuningSettings(n_virtual_tokens=P, reparameterize=method == "prefix-mlp",
                                                        hidden=24))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("method", ["ia3", "prompt", "prefix", "prefix-mlp"])
def test_peft_loads_llmkit_export_with_same_logits(method, base_dir, tmp_path):
    model = llmkit_with(method, base_dir)
    export_peft_adapter(model, tmp_path)
    reference = PeftModel.from_pretrained(hf_model(base_dir), tmp_path).eval()
    tokens = ids()
    expected = peft_logits(reference, tokens)
    assert close(logits_of(model, tokens), expected[:, P:] if method == "prompt" else expected)


@pytest.mark.parametrize("method", ["ia3", "prompt", "prefix", "prefix-mlp"])
def test_llmkit_imports_peft_adapter_with_same_logits(method, base_dir, tmp_path):
    reference = {"ia3": lambda: peft_ia3(base_dir), "prompt": lambda: peft_prompt_tuning(base_dir),
                 "prefix": lambda: peft_prefix_tuning(base_dir, False),
                 "prefix-mlp": lambda: peft_prefix_tuning(base_dir, True)}[method]()
    reference.save_pretrained(tmp_path)
    model = import_peft_adapter(llmkit_model(base_dir), tmp_path)
    tokens = ids()
    expected = peft_logits(reference, tokens)
    assert close(logits_of(model, tokens), expected[:, P:] if method == "prompt" else expected)
    # and back out: the same files peft wrote (a folded prefix is written as a plain one: prefix_projection false)
    written = json.loads((tmp_path / PEFT_CONFIG_FILE).read_text())
    export_peft_adapter(model, tmp_path / "again", written["base_model_name_or_path"])
    again = json.loads((tmp_path / "again" / PEFT_CONFIG_FILE).read_text())
    if method == "prefix-mlp":
        written.update(prefix_projection=False)
    assert {key: sorted(value) if isinstance(value, list) else value for key, value in again.items()} == \
        {key: sorted(value) if isinstance(value, list) else value for key, value in written.items()}
    first, second = load_file(tmp_path / PEFT_WEIGHTS_FILE), load_file(tmp_path / "again" / PEFT_WEIGHTS_FILE)
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


# --------------------------------------------------------------------------- behaviour every method shares


# What each method of the registry trains, by parameter name. The suite runs over llmkit.peft.registry.METHODS: a new
# method fails test_every_registered_method_is_covered until it is described here (none is left out silently).
TRAINS: dict[str, Callable[[str], bool]] = {
    "lora": lambda name: ".lora_A." in name or ".lora_B." in name,
    "qlora": lambda name: ".lora_A." in name or ".lora_B." in name,  # the NF4 base holds buffers, not parameters
    "ia3": lambda name: name.endswith(".ia3_scale"),
    "prompt": lambda name: name.startswith("soft_prompt."),
    "prefix": lambda name: name.startswith("kv_prefix."),
    "adapter": lambda name: "_adapter." in name,
    "selective": lambda name: name.startswith(("blocks.", "final_norm.")),  # default: the last 2 blocks (all here)
}
NOT_COVERED: dict[str, str] = {}  # method -> why this suite cannot run it (none today)


def test_every_registered_method_is_covered():
    assert set(TRAINS) | set(NOT_COVERED) == set(METHODS), "describe each new method in TRAINS (or NOT_COVERED, why)"
    assert not set(TRAINS) & set(NOT_COVERED)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_learning_keeps_the_decoder_its_names_and_room_in_the_cache(method, base_dir):
    base_names = set(llmkit_model(base_dir).state_dict())
    model = apply_method(llmkit_model(base_dir), method, METHODS[method][0](n_virtual_tokens=P))
    assert isinstance(model, Decoder)  # still a Decoder: blocks for FSDP, kernel, config, checkpoint key maps
    added = set(model.state_dict()) - base_names
    assert base_names < set(model.state_dict()) and added
    assert all(TRAINS[method](name) for name in added)  # base tensors keep their names
    assert model.new_cache(2, 10).max_len == 10 + P  # the virtual tokens take the cache's first P slots


def perturb_trainable(model: torch.nn.Module, scale: float) -> None:
    """Move every trainable parameter off its start value (B = 0, up = 0 would hide the parts behind them)."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn_like(parameter))


@pytest.mark.parametrize("method", sorted(TRAINS))
def test_only_the_method_parameters_get_gradients(method, base_dir):
    torch.manual_seed(3)
    model = apply_method(llmkit_model(base_dir), method).train()
    perturb_trainable(model, 0.1)
    causal_lm_loss(model, causal_lm_batch(ids(length=13))).mean().backward()
    trained = {name for name, parameter in model.named_parameters() if parameter.grad is not None}
    assert trained == {name for name, _ in model.named_parameters() if TRAINS[method](name)}
    assert trained and all(parameter.grad.abs().sum() > 0 for name, parameter in model.named_parameters()
                           if name in trained)


@pytest.mark.parametrize("method", [*sorted(TRAINS), "prefix-folded"])
def test_llmkit_adapter_round_trip(method, base_dir, tmp_path):
    name = method.removesuffix("-folded")
    settings = METHODS[name][0]()
    torch.manual_seed(3)
    model = apply_method(llmkit_model(base_dir), name, settings)
    perturb_trainable(model, 0.1)
    if method == "prefix-folded":
        settings = merge_prefix_tuning(model).kv_prefix.settings  # a plain prefix now: saved without the MLP
    save_adapter(model, tmp_path, name, settings)
    loaded = load_adapter(llmkit_model(base_dir), tmp_path)  # re-applies the method the directory names
    tokens = ids()
    assert torch.equal(logits_of(loaded, tokens), logits_of(model, tokens))


def test_adapters_start_as_the_identity_and_keep_base_names(base_dir):
    base = llmkit_model(base_dir)
    names = set(base.state_dict())
    model = apply_adapters(llmkit_model(base_dir), AdapterSettings(bottleneck=8, activation="relu"))
    assert names < set(model.state_dict())
    tokens = ids()
    assert torch.equal(logits_of(model, tokens), logits_of(base, tokens))
    encoder = Encoder(Config.from_name("tiny-bert")).eval()  # post-norm blocks: the adapter sits before each norm
    expected = logits_of(encoder, tokens)
    assert torch.equal(logits_of(apply_adapters(encoder), tokens), expected)
    assert len([name for name in encoder.state_dict() if "_adapter." in name]) == 2 * 2 * 4  # layers x sublayers x 4


def test_ia3_merged_equals_unmerged_and_unmerge_restores_weights(base_dir):
    model = llmkit_with("ia3", base_dir)
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    tokens = ids()
    unmerged = logits_of(model, tokens)
    merge_ia3(model)
    assert not torch.equal(model.blocks[0].attn.k_proj.weight, weights["blocks.0.attn.k_proj.weight"])
    assert close(logits_of(model, tokens), unmerged)
    unmerge_ia3(model)
    assert all(torch.allclose(model.state_dict()[name], tensor, atol=1e-6) for name, tensor in weights.items())
    assert close(logits_of(model, tokens), unmerged)


def greedy_without_cache(logits_fn, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation re-running the full forward (no cache) on the growing sequence each step."""
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(logits_fn(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("method", ["prompt", "prefix", "prefix-mlp"])
def test_generation_with_cache_equals_full_forward_greedy(method, base_dir, tmp_path):
    model = llmkit_with(method, base_dir)
    export_peft_adapter(model, tmp_path)
    # peft's forward is the reference; its generate() is not: with peft 0.21.2 and transformers 5.24 it drops the
    # prefix when it uses a cache (the base model's tokens come out) and drifts from its own forward without one.
    reference = PeftModel.from_pretrained(hf_model(base_dir), tmp_path).eval()
    base = llmkit_model(base_dir)
    prompts = [ids(1, 9, seed=2)[0].tolist(), ids(1, 4, seed=3)[0].tolist()]  # left padding for the second
    steps = list(generate_tokens(model, prompts, max_new_tokens=8))
    for row, prompt in enumerate(prompts):
        generated = [step[row] for step in steps]
        assert generated == greedy_without_cache(lambda tokens: logits_of(model, tokens), prompt, 8)
        assert generated == greedy_without_cache(lambda tokens: peft_logits(reference, tokens), prompt, 8)
        assert generated != greedy_without_cache(lambda tokens: logits_of(base, tokens), prompt, 8)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("make, message", [
    (lambda: IA3Settings(targets=()), "targets is empty"),
    (lambda: IA3Settings(feedforward=("up_proj",)), "not in targets"),
    (lambda: PromptTuningSettings(n_virtual_tokens=0), "n_virtual_tokens=0 must be an integer >= 1"),
    (lambda: PromptTuningSettings(init="vocab"), "init='vocab' is not one of"),
    (lambda: PromptTuningSettings(init="text"), "init='text' needs init_text"),
    (lambda: PrefixTuningSettings(hidden=0), "hidden=0 must be an integer >= 1"),
    (lambda: AdapterSettings(bottleneck=-1), "bottleneck=-1 must be an integer >= 1"),
    (lambda: AdapterSettings(activation="swish"), "activation='swish' is not one of"),
])
def test_bad_settings(make, message):
    with pytest.raises(LlmkitError, match=message):
        make()


def test_method_application_errors(base_dir):
    model = llmkit_model(base_dir)
    with pytest.raises(LlmkitError, match=r"IA3 targets \['qkv'\] match no module"):
        apply_ia3(model, IA3Settings(targets=("qkv",), feedforward=()))
    with pytest.raises(LlmkitError, match="IA3 target blocks.0.attn_norm is a RMSNorm, not a linear"):
        apply_ia3(model, IA3Settings(targets=("attn_norm",), feedforward=()))
    with pytest.raises(LlmkitError, match="no IA3 vectors to merge"):
        merge_ia3(model)
    with pytest.raises(LlmkitError, match="no prefix to fold"):
        merge_prefix_tuning(model)
    with pytest.raises(LlmkitError, match="init='text' needs the model's tokenizer"):
        apply_prompt_tuning(model, PromptTuningSettings(init="text", init_text="hello"))
    backend = BackendTokenizer(models.WordLevel({"a": 0}, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # a blank text has no words, so no tokens
    empty = Tokenizer(backend)
    with pytest.raises(LlmkitError, match="encodes to no tokens"):
        apply_prompt_tuning(model, PromptTuningSettings(init="text", init_text=" "), empty)
    with pytest.raises(LlmkitError, match="prefix tuning needs an llmkit Decoder"):
        apply_prefix_tuning(torch.nn.Linear(2, 2))
    with pytest.raises(LlmkitError, match="no transformer blocks"):
        apply_adapters(torch.nn.Linear(2, 2))
    apply_ia3(model)
    with pytest.raises(LlmkitError, match="already has IA3 vectors"):
        apply_ia3(model)
    merge_ia3(model)
    with torch.no_grad():
        model.blocks[1].mlp.down_proj.ia3_scale[3] = 0.0
    with pytest.raises(LlmkitError, match=r"blocks.1.mlp.down_proj.ia3_scale holds a zero"):
        unmerge_ia3(model)
    apply_prompt_tuning(model)
    with pytest.raises(LlmkitError, match="already has a soft prompt or a prefix"):
        apply_prefix_tuning(model)
    with pytest.raises(LlmkitError, match=r"attention_mask has shape \(2, 3\); expected"):
        model(ids(), attention_mask=torch.ones(2, 3))
    with pytest.raises(LlmkitError, match="document_ids .* do not combine with prompt or prefix tuning"):
        model(ids(), document_ids=torch.zeros(2, 12, dtype=torch.long))
    apply_adapters(model)
    with pytest.raises(LlmkitError, match="already has bottleneck adapters"):
        apply_adapters(model)


def test_export_errors(base_dir, tmp_path):
    with pytest.raises(LlmkitError, match="needs exactly one of IA3, prompt tuning or prefix tuning"):
        export_peft_adapter(llmkit_model(base_dir), tmp_path)
    with pytest.raises(LlmkitError, match="bottleneck adapters have no peft equivalent"):
        export_peft_adapter(apply_adapters(llmkit_model(base_dir)), tmp_path)
    gpt2 = apply_ia3(Decoder(Config.from_name("tiny-gpt2")))
    with pytest.raises(LlmkitError, match="GPT2LMHeadModel checkpoint fuses some of the IA3 targets"):
        export_peft_adapter(gpt2, tmp_path)


def write_peft(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / PEFT_CONFIG_FILE).write_text(json.dumps(config))
    save_file(tensors, str(directory / PEFT_WEIGHTS_FILE))
    return directory


def test_import_errors(base_dir, tmp_path):
    model = llmkit_model(base_dir)
    prompt = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_layers": 2, "num_virtual_tokens": P,
              "num_transformer_submodules": 1}
    cases = [
        (tmp_path / "nothing", None, None, "is not a PEFT adapter directory"),
        (tmp_path / "lora", {"peft_type": "LORA"}, {}, "peft_type 'LORA'; this importer reads IA3"),
        (tmp_path / "seq", {**prompt, "task_type": "SEQ_2_SEQ_LM"}, {}, "task_type 'SEQ_2_SEQ_LM'"),
        (tmp_path / "layers", {**prompt, "num_layers": 3}, {"prompt_embeddings": torch.zeros(P, 64)},
         "for a model with 3 layers"),
        (tmp_path / "width", prompt, {"prompt_embeddings": torch.zeros(P, 32)},
         r"prompt_embeddings of shape \(5, 64\) for this model, found shape \(5, 32\)"),
        (tmp_path / "ia3-key", {"peft_type": "IA3"}, {"base_model.model.model.layers.0.self_attn.k_proj.lora_A":
                                                       torch.ones(16, 1)}, "not an IA3 vector"),
        (tmp_path / "ia3-layer", {"peft_type": "IA3"}, {"base_model.model.model.layers.7.self_attn.k_proj.ia3_l":
                                                         torch.ones(32, 1)}, "model.layers.7.self_attn.k_proj is not part"),
        (tmp_path / "ia3-some", {"peft_type": "IA3"}, {"base_model.model.model.layers.0.self_attn.k_proj.ia3_l":
                                                        torch.ones(32, 1)}, "an adapter that skips layers"),
        (tmp_path / "ia3-size", {"peft_type": "IA3"}, {f"base_model.model.model.layers.{i}.self_attn.k_proj.ia3_l":
                                                        torch.ones(16, 1) for i in range(2)}, "has 16 entries"),
    ]
    for directory, config, tensors, message in cases:
        if config is not None:
            write_peft(directory, config, tensors)
        with pytest.raises(LlmkitError, match=message):
            import_peft_adapter(model, directory)
    write_peft(tmp_path / "broken", prompt, {}).joinpath(PEFT_WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(LlmkitError, match="adapter_model.safetensors is missing or unreadable"):
        import_peft_adapter(model, tmp_path / "broken")
    assert type(model) is Decoder and not ia3_layers(model)  # a refused adapter leaves the model untouched (no prompt)
    fused = {"base_model.model.transformer.h.0.attn.c_attn.ia3_l": torch.ones(192, 1),
             "base_model.model.transformer.h.1.attn.c_attn.ia3_l": torch.ones(192, 1)}
    write_peft(tmp_path / "gpt2", {"peft_type": "IA3"}, fused)
    with pytest.raises(LlmkitError, match="scales a fused GPT2LMHeadModel projection"):
        import_peft_adapter(Decoder(Config.from_name("tiny-gpt2")), tmp_path / "gpt2")
