"""Multi-LoRA batching (llmkit.peft.multi_lora) held against the merged model and against peft: a batch that mixes
adapters of different ranks and base rows gives each row what that row alone gives with its adapter merged into
the weights; a PEFT adapter directory gives peft's own logits; a quantized base works; errors name the fix."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from llmkit.checkpoints.hf import load_hf
from llmkit.errors import LlmkitError
from llmkit.models.decoder import Decoder
from llmkit.peft.core import save_adapter
from llmkit.peft.lora import adapter_names, apply_lora, merge_lora
from llmkit.peft.multi_lora import batch_adapters, load_lora_adapter, remove_lora_adapter
from llmkit.peft.registry import apply_method, load_adapter
from llmkit.quant import dequantize, quantize
from tests.helpers import byte_tokenizer, cli_status, random_lora_dir, run_cli, tiny_decoder

pytestmark = pytest.mark.usefixtures("one_thread")
# fp32 everywhere: merged (W0 + s B A) x and W0 x + s B (A x) differ only in summation order (~1e-6 on logits of
# size ~1); a row given another row's adapter, a wrong scale or a missed layer moves them by 1e-2 or more.
TOLERANCE = 1e-5
RANKS = {"small": 2, "medium": 4, "large": 8}


def merged_logits(base: nn.Module, directory, ids: torch.Tensor) -> torch.Tensor:
    """The reference: the adapter loaded the ordinary way (llmkit.peft.registry) and merged into the weights."""
    model = merge_lora(load_adapter(copy.deepcopy(base), directory)).eval()
    with torch.no_grad():
        return model(ids)


def ids_for(rows: int, length: int = 10, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(rows))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny fp32 decoder and three llmkit adapters of ranks 2, 4, 8 (different targets, too)."""
    base = tiny_decoder("tiny-llama")
    root = tmp_path_factory.mktemp("adapters")
    targets = {"small": ("q_proj", "v_proj"), "medium": ("q_proj", "k_proj", "v_proj", "o_proj"),
               "large": ("o_proj", "down_proj", "up_proj")}
    for seed, (name, rank) in enumerate(RANKS.items()):
        random_lora_dir(base, root / name, rank, seed, targets=targets[name])
    return base, root


def multi_model(base: nn.Module, root) -> nn.Module:
    model = copy.deepcopy(base)
    for name in RANKS:
        load_lora_adapter(model, name, root / name)
    return model


def test_mixed_batch_equals_each_row_merged(adapters):
    base, root = adapters
    model = multi_model(base, root)
    rows = ["small", None, "large", "medium", None, "small"]
    ids = ids_for(len(rows))
    with torch.no_grad(), batch_adapters(model, rows):
        mixed = model(ids)
    for row, name in enumerate(rows):
        if name is None:
            with torch.no_grad():
                expected = base(ids[row : row + 1])
        else:
            expected = merged_logits(base, root / name, ids[row : row + 1])
        assert (mixed[row] - expected[0]).abs().max().item() <= TOLERANCE, (row, name)
    # outside batch_adapters the model is the base again
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))


def test_decode_with_a_cache_row_by_row(adapters):
    """One prefill of the whole prompt, then one-token steps through the KV cache, each row its adapter."""
    base, root = adapters
    model = multi_model(base, root)
    rows = ["large", "small", None]
    ids = ids_for(len(rows), length=8)
    with torch.no_grad(), batch_adapters(model, rows):
        cache = model.new_cache(len(rows), 16)
        model(ids[:, :6], cache=cache)
        stepped = model(ids[:, 6:7], cache=cache)[:, -1]  # (B, V)
    for row, name in enumerate(rows):
        expected = base(ids[row : row + 1, :7]) if name is None else merged_logits(base, root / name, ids[row : row + 1, :7])
        assert (stepped[row] - expected[0, -1]).abs().max().item() <= TOLERANCE


def test_add_and_remove_at_run_time(adapters):
    base, root = adapters
    model = multi_model(base, root)
    ids = ids_for(2)
    remove_lora_adapter(model, "medium")
    assert adapter_names(model) == ["small", "large"]
    with pytest.raises(LlmkitError, match=r"batch_adapters names adapters \['medium'\] the model does not have"):
        with batch_adapters(model, ["medium", None]):
            pass
    load_lora_adapter(model, "again", root / "medium")  # under a new name: its tensors are renamed on load
    with torch.no_grad(), batch_adapters(model, ["again", "large"]):
        mixed = model(ids)
    assert (mixed[0] - merged_logits(base, root / "medium", ids[:1])[0]).abs().max().item() <= TOLERANCE
    assert (mixed[1] - merged_logits(base, root / "large", ids[1:])[0]).abs().max().item() <= TOLERANCE


def test_quantized_base(adapters):
    """int8 and q4_0 bases: the low-rank updates add to the packed product. Reference: the dequantized weights with
    the adapter merged. Tolerance 1e-4: the packed kernels' own summation order against a float matmul of the same
    dequantized weights (measured ~1e-6 to 1e-5 here); a missing update moves the logits by ~1e-1."""
    base, root = adapters
    for scheme in ("int8", "q4_0"):
        quantized = quantize(copy.deepcopy(base), scheme, group_size=32 if scheme == "q4_0" else None)
        model = copy.deepcopy(quantized)
        for name in ("small", "large"):
            load_lora_adapter(model, name, root / name)
        ids = ids_for(3)
        with torch.no_grad(), batch_adapters(model, ["large", None, "small"]):
            mixed = model(ids)
        float_base = dequantize(copy.deepcopy(quantized))
        for row, name in enumerate(["large", None, "small"]):
            if name is None:
                with torch.no_grad():
                    expected = float_base(ids[row : row + 1])
            else:
                expected = merged_logits(float_base, root / name, ids[row : row + 1])
            assert (mixed[row] - expected[0]).abs().max().item() <= 1e-4, (scheme, name)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random HF Llama (GQA) and the llmkit Decoder loaded from its saved directory."""
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, parameter in hf_model.named_parameters():
            parameter.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
    directory = tmp_path_factory.mktemp("llama")
    hf_model.save_pretrained(directory)
    config, state = load_hf(directory)
    model = Decoder(config)
    model.load_state_dict(state)
    return hf_model, model.eval()


def test_peft_directories_match_peft_mixed_batch(llama, tmp_path):
    """Two PEFT adapter directories (ranks 2 and 8) in one llmkit batch give peft's own mixed-batch logits
    (`adapter_names=` per row, peft's multi-adapter inference) on the same weights."""
    hf_model, base = llama
    peft_model = None
    for seed, (name, rank, targets) in enumerate([("one", 2, ["q_proj", "v_proj"]),
                                                  ("two", 8, ["k_proj", "o_proj", "down_proj"])]):
        config = LoraConfig(r=rank, lora_alpha=3 * rank, target_modules=targets, init_lora_weights=False)
        torch.manual_seed(seed)
        if peft_model is None:
            peft_model = get_peft_model(copy.deepcopy(hf_model), config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    peft_model.save_pretrained(tmp_path)  # writes tmp_path/one and tmp_path/two (non-default names go in subfolders)
    model = copy.deepcopy(base)
    load_lora_adapter(model, "one", tmp_path / "one")
    load_lora_adapter(model, "two", tmp_path / "two")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / "one", adapter_name="one")
    reloaded.load_adapter(tmp_path / "two", adapter_name="two")
    rows = ["two", "__base__", "one", "two"]
    ids = torch.randint(0, 96, (4, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reloaded.eval()(ids, adapter_names=rows).logits
        with batch_adapters(model, [None if row == "__base__" else row for row in rows]):
            mixed = model(ids)
    assert (mixed - expected).abs().max().item() <= TOLERANCE


def test_refuses_other_methods_and_dora(adapters, tmp_path):
    base, root = adapters
    model = copy.deepcopy(base)
    ia3 = apply_method(copy.deepcopy(base), "ia3")
    from llmkit.peft.settings import IA3Settings

    save_adapter(ia3, tmp_path / "ia3", "ia3", IA3Settings())
    with pytest.raises(LlmkitError, match=r"holds a 'ia3' adapter; multi-adapter batching takes LoRA adapters only"):
        load_lora_adapter(model, "x", tmp_path / "ia3")
    random_lora_dir(base, tmp_path / "dora", 2, 0, dora=True)
    with pytest.raises(LlmkitError, match=r"is a DoRA adapter; multi-adapter batching takes plain LoRA only"):
        load_lora_adapter(model, "x", tmp_path / "dora")
    with pytest.raises(LlmkitError, match=r"adapter path .*nowhere is not a directory"):
        load_lora_adapter(model, "x", tmp_path / "nowhere")
    (tmp_path / "peft_ia3").mkdir()
    (tmp_path / "peft_ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(LlmkitError, match=r"holds a 'IA3' adapter"):
        load_lora_adapter(model, "x", tmp_path / "peft_ia3")
    assert adapter_names(model) == []  # nothing half-loaded stays behind


def test_errors_name_the_fix(adapters, tmp_path):
    base, root = adapters
    model = multi_model(base, root)
    with pytest.raises(LlmkitError, match=r"already has an adapter named 'small'; remove it first"):
        load_lora_adapter(model, "small", root / "medium")
    with pytest.raises(LlmkitError, match=r"given 3 adapter names but .* sees a batch of 2 rows"):
        with torch.no_grad(), batch_adapters(model, ["small", None, None]):
            model(ids_for(2))
    other = tiny_decoder("tiny-llama", d_model=32, n_heads=2, n_kv_heads=1)
    with pytest.raises(LlmkitError, match=r"belongs to another base model"):
        load_lora_adapter(other, "small", root / "small")
    assert adapter_names(other) == []
    with pytest.raises(LlmkitError, match=r"the model has no adapter 'nope'"):
        remove_lora_adapter(model, "nope")


def test_generate_cli_runs_each_prompt_with_its_adapter(adapters, tmp_path, capsys):
    """`llmkit generate --adapters`: one batch, prompt i with adapter i, equals each prompt run alone with --adapter."""
    from llmkit.checkpoints import save_model

    base, root = adapters
    save_model(base, tmp_path / "tiny", byte_tokenizer())
    model = str(tmp_path / "tiny")
    prompts = ["First the", "And then", "Last of all"]
    code, out, err = run_cli(capsys, "generate", "--model", model, "--max_new_tokens", "6",
                             "--prompt", f"[{', '.join(prompts)}]",
                             "--adapters", f"[{root / 'large'}, base, {root / 'small'}]")
    assert code == 0, err
    texts = [block.split("\n", 1)[1].rstrip("\n") for block in out.split("--- [")[1:]]
    alone = []
    for prompt, adapter in zip(prompts, [root / "large", None, root / "small"]):
        extra = ["--adapter", str(adapter)] if adapter else []
        code, single, err = run_cli(capsys, "generate", "--model", model, "--max_new_tokens", "6", "--prompt",
                                    f"[{prompt}, {prompt}]", *extra)  # a batch of two: the same left-padded path
        alone.append(single.split("--- [")[1].split("\n", 1)[1].rstrip("\n"))
    assert texts == alone
    assert len(set(alone)) == 3  # the adapters change what the model writes
    code, err = cli_status(capsys, "generate", "--model", model, "--prompt", "[a, b]", "--adapters", "[base]")
    assert code == 2 and "--adapters lists 1 entries for 2 prompts" in err


def test_qlora_trained_adapter_applies_to_the_loaded_base(adapters, tmp_path):
    """A qlora adapter's A and B, loaded onto the fp32 base, equal the same A and B as a LoRA merged into it."""
    from llmkit.peft.core import load_trained_tensors, read_adapter
    from llmkit.peft.qlora import QLoraSettings, apply_qlora

    base, _ = adapters
    settings = QLoraSettings(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    trained = apply_qlora(copy.deepcopy(base), settings)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    save_adapter(trained, tmp_path / "qlora", "qlora", settings)
    model = copy.deepcopy(base)
    load_lora_adapter(model, "q", tmp_path / "qlora")
    reference = apply_lora(copy.deepcopy(base), settings.lora())
    load_trained_tensors(reference, read_adapter(tmp_path / "qlora")[2], tmp_path / "qlora")
    ids = ids_for(2)
    with torch.no_grad(), batch_adapters(model, ["q", None]):
        mixed = model(ids)
    with torch.no_grad():
        expected = merge_lora(reference.eval())(ids[:1])
        assert (mixed[0] - expected[0]).abs().max().item() <= TOLERANCE
        assert (mixed[1] - base(ids[1:])[0]).abs().max().item() <= TOLERANCE
