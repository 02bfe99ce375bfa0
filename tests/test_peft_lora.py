"""LoRA, rsLoRA and DoRA held against Hugging Face `peft` on a tiny random Llama built here: the same A, B (and
magnitude) in both give the same logits; adapter files cross between the two; merge, unload, switching, disabling
and training touch exactly what they should. Error paths check the message names the thing and the fix."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from llmkit.checkpoints.hf import export_hf, load_hf
from llmkit.errors import LlmkitError
from llmkit.models.decoder import Decoder
from llmkit.nn.linear import Linear
from llmkit.peft.core import load_trained_tensors, read_adapter, save_adapter
from llmkit.peft.hf_peft import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, export_peft_lora, import_peft_lora
from llmkit.peft.lora import (
    LoraLinear,
    LoraSettings,
    adapter_names,
    add_adapter,
    apply_lora,
    disable_adapters,
    lora_layers,
    merge_and_unload,
    merge_lora,
    set_adapter,
    unmerge_lora,
)
from llmkit.quant.nf4 import NF4Linear

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 96
# fp32 on both sides: only the summation order differs (~1e-6 on these logits of size ~2), while a wrong scale,
# a missing DoRA term or a swapped A/B moves them by 1e-2 or more.
TOLERANCE = 1e-5
METHODS = {"lora": {}, "rslora": {"rslora": True}, "dora": {"dora": True}}


def randomize(model: nn.Module) -> None:
    """Weights far from the HF init (norms at one, std 0.02), so every tensor moves the logits."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[LlamaForCausalLM, Decoder]:
    """A random HF Llama (GQA, untied head) and the llmkit Decoder imported from its saved directory."""
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        attn_implementation="eager")).eval()
    randomize(hf_model)
    directory = tmp_path_factory.mktemp("llama")
    hf_model.save_pretrained(directory)
    config, state = load_hf(directory)
    model = Decoder(config)
    model.load_state_dict(state)
    return hf_model, model.eval()


def token_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def randomize_adapter(model: nn.Module, seed: int = 0) -> None:
    """Non-zero B (a fresh adapter's B is zero, which would hide every bug in B A) and magnitudes off ||W0||."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_magnitude." in name:
                parameter.mul_(torch.empty_like(parameter).uniform_(0.7, 1.3, generator=generator))
            elif ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def peft_module(name: str) -> str:
    """llmkit Llama module name -> peft's (written out here, independently of llmkit's key map)."""
    return "base_model.model." + name.replace("blocks.", "model.layers.", 1).replace(".attn.", ".self_attn.")


def lora_model(base: Decoder, **settings) -> Decoder:
    model = apply_lora(copy.deepcopy(base), LoraSettings(rank=4, alpha=8.0, **settings))
    randomize_adapter(model)
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- parity with peft


def peft_copy(hf_model: LlamaForCausalLM, model: Decoder) -> PeftModel:
    """peft on the HF model with the llmkit model's settings, then the llmkit adapter tensors copied in."""
    settings = next(iter(lora_layers(model).values())).settings["default"]
    peft_model = get_peft_model(copy.deepcopy(hf_model), LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, use_rslora=settings.rslora,
        use_dora=settings.dora, target_modules=list(settings.targets)))
    adapted = {name for name, module in peft_model.named_modules() if hasattr(module, "lora_magnitude_vector")}
    assert adapted == {peft_module(name) for name in lora_layers(model)}  # every peft layer gets llmkit's tensors
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            target = peft_model.get_submodule(peft_module(name))
            target.lora_A["default"].weight.copy_(layer.lora_A["default"])
            target.lora_B["default"].weight.copy_(layer.lora_B["default"])
            if settings.dora:
                target.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude["default"])
    return peft_model


@pytest.mark.parametrize("method", list(METHODS))
def test_logits_match_peft(method, reference):
    hf_model, base = reference
    model = lora_model(base, **METHODS[method])
    peft_model = peft_copy(hf_model, model).eval()
    expected = logits(peft_model, token_ids())
    assert difference(expected, logits(hf_model, token_ids())) > 1e-2  # the adapter changes the outputs
    assert difference(logits(model, token_ids()), expected) <= TOLERANCE


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_dropout_in_training_matches_peft(method, reference):
    """Both draw dropout masks from the global generator in the same layer order (q, k, v, o, gate, up, down)."""
    hf_model, base = reference
    model = lora_model(base, dropout=0.3, **METHODS[method]).train()
    peft_model = peft_copy(hf_model, model).train()
    outputs = []
    for network in (model, peft_model):
        torch.manual_seed(7)
        outputs.append(logits(network, token_ids()))
    assert difference(outputs[0], logits(model.eval(), token_ids())) > 1e-2  # dropout acted
    assert difference(*outputs) <= TOLERANCE


@pytest.mark.parametrize("method, targets, peft_targets", [
    ("lora", None, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ("dora", ("q_proj", "v_proj"), ["q_proj", "v_proj"]),
    # not every layer of a kind: peft gets the full module names
    ("rslora", ("blocks.1.attn.q_proj", "blocks.0.mlp.*"), ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj",
                                                           "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"]),
])
def test_export_loads_in_peft(method, targets, peft_targets, reference, tmp_path):
    hf_model, base = reference
    model = lora_model(base, **METHODS[method], **({"targets": targets} if targets else {}))
    export_peft_lora(model, tmp_path, base_model_name_or_path="tiny-llama-here")
    record = json.loads((tmp_path / PEFT_CONFIG_FILE).read_text())
    assert record["peft_type"] == "LORA" and record["task_type"] == "CAUSAL_LM" and record["r"] == 4
    assert record["lora_alpha"] == 8 and record["use_dora"] == (method == "dora")
    assert record["use_rslora"] == (method == "rslora") and record["base_model_name_or_path"] == "tiny-llama-here"
    assert record["target_modules"] == peft_targets
    keys = set(load_file(tmp_path / PEFT_WEIGHTS_FILE))
    per_layer = ["lora_A.weight", "lora_B.weight"] + (["lora_magnitude_vector"] if method == "dora" else [])
    assert keys == {f"{peft_module(name)}.{part}" for name in lora_layers(model) for part in per_layer}
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path).eval()
    assert difference(logits(model, token_ids()), logits(peft_model, token_ids())) <= TOLERANCE


@pytest.mark.parametrize("method", list(METHODS))
def test_peft_saved_adapter_imports(method, reference, tmp_path):
    hf_model, base = reference
    torch.manual_seed(3)
    # init_lora_weights=False leaves B random (not zero); layers_to_transform adapts layer 1 only
    peft_model = get_peft_model(copy.deepcopy(hf_model), LoraConfig(
        r=4, lora_alpha=6, target_modules=["q_proj", "down_proj"], init_lora_weights=False, layers_to_transform=[1],
        use_rslora=method == "rslora", use_dora=method == "dora")).eval()
    peft_model.save_pretrained(tmp_path)
    model = import_peft_lora(copy.deepcopy(base), tmp_path).eval()
    assert sorted(lora_layers(model)) == ["blocks.1.attn.q_proj", "blocks.1.mlp.down_proj"]
    expected = logits(peft_model, token_ids())
    assert difference(expected, logits(hf_model, token_ids())) > 1e-2
    assert difference(logits(model, token_ids()), expected) <= TOLERANCE


def test_gpt2_adapter_crosses_both_ways(tmp_path):
    """GPT-2 stores Conv1D weights (in, out) and fuses q, k, v in c_attn: LoRA on c_fc / c_proj maps, q_proj cannot."""
    torch.manual_seed(0)
    hf_model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                          attn_implementation="eager")).eval()
    randomize(hf_model)
    hf_model.save_pretrained(tmp_path / "base")
    config, state = load_hf(tmp_path / "base")
    base = Decoder(config)
    base.load_state_dict(state)
    peft_model = get_peft_model(copy.deepcopy(hf_model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_fc", "c_proj"], fan_in_fan_out=True, init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    model = import_peft_lora(copy.deepcopy(base).eval(), tmp_path / "peft")
    assert difference(logits(model, token_ids()), logits(peft_model, token_ids())) <= TOLERANCE
    export_peft_lora(model, tmp_path / "llmkit")
    assert json.loads((tmp_path / "llmkit" / PEFT_CONFIG_FILE).read_text())["fan_in_fan_out"] is True
    reloaded = PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / "llmkit").eval()
    assert difference(logits(reloaded, token_ids()), logits(model, token_ids())) <= TOLERANCE
    fused = apply_lora(copy.deepcopy(base), LoraSettings(targets=("q_proj",)))
    with pytest.raises(LlmkitError, match=r"blocks.0.attn.q_proj has no module of its own in a GPT2LMHeadModel.*"
                                          r"save_adapter"):
        export_peft_lora(fused, tmp_path / "fused")


# --------------------------------------------------------------------------- merge, unload, switch, train


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_equals_unmerged(method, reference):
    _, base = reference
    model = lora_model(base, **METHODS[method])
    weight = model.blocks[0].attn.q_proj.weight.detach().clone()
    expected = logits(model, token_ids())
    merge_lora(model)
    assert model.blocks[0].attn.q_proj.merged == "default"
    assert difference(model.blocks[0].attn.q_proj.weight, weight) > 1e-2  # the update went into the weight
    assert difference(logits(model, token_ids()), expected) <= TOLERANCE
    unmerge_lora(model)
    assert model.blocks[0].attn.q_proj.merged is None
    assert difference(model.blocks[0].attn.q_proj.weight, weight) <= 1e-6
    assert difference(logits(model, token_ids()), expected) <= TOLERANCE


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_and_unload_leaves_the_base_names(method, reference, tmp_path):
    _, base = reference
    model = lora_model(base, **METHODS[method])
    expected = logits(model, token_ids())
    plain = merge_and_unload(model)
    assert list(plain.state_dict()) == list(base.state_dict())
    assert type(plain.blocks[1].mlp.down_proj) is Linear and not lora_layers(plain)
    assert difference(logits(plain, token_ids()), expected) <= TOLERANCE
    export_hf(plain, tmp_path)  # what `llmkit finetune --merge` saves: a plain checkpoint


def test_two_adapters_switch_and_disable(reference):
    _, base = reference
    model = apply_lora(copy.deepcopy(base), LoraSettings(rank=4, targets=("q_proj", "v_proj"), adapter_name="first"))
    add_adapter(model, LoraSettings(rank=2, targets=("o_proj", "up_proj", "q_proj"), adapter_name="second", dora=True))
    randomize_adapter(model)
    assert adapter_names(model) == ["first", "second"]
    first = logits(model, token_ids())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"blocks.{i}.attn.{m}.lora_{ab}.first" for i in (0, 1) for m in ("q_proj", "v_proj") for ab in "AB"}
    set_adapter(model, "second")
    second = logits(model, token_ids())
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"second"}
    # the second adapter alone on a fresh copy, with the same tensors, gives the same logits: no cross-talk
    alone = apply_lora(copy.deepcopy(base), LoraSettings(rank=2, targets=("o_proj", "up_proj", "q_proj"),
                                                         adapter_name="second", dora=True))
    load_trained_tensors(alone, {n: p for n, p in model.named_parameters() if p.requires_grad}, "the model")
    assert difference(logits(alone, token_ids()), second) <= TOLERANCE
    set_adapter(model, "first")
    assert torch.equal(logits(model, token_ids()), first)
    base_logits = logits(base, token_ids())
    assert difference(first, base_logits) > 1e-2 and difference(second, base_logits) > 1e-2
    with disable_adapters(model):
        assert torch.equal(logits(model, token_ids()), base_logits)
    merge_lora(model)
    with disable_adapters(model):  # a merged adapter is taken out meanwhile, and merged again after
        assert difference(logits(model, token_ids()), base_logits) <= TOLERANCE
    assert model.blocks[0].attn.q_proj.merged == "first"
    assert difference(logits(model, token_ids()), first) <= TOLERANCE


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_only_adapter_parameters_get_gradients(method, reference):
    _, base = reference
    model = lora_model(base, dropout=0.1, **METHODS[method]).train()
    ids = token_ids()
    F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for name, parameter in model.named_parameters():
        if ".lora_" in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None and not parameter.requires_grad, name
    kinds = {name.split(".")[-2] for name, parameter in model.named_parameters() if parameter.grad is not None}
    assert kinds == ({"lora_A", "lora_B", "lora_magnitude"} if method == "dora" else {"lora_A", "lora_B"})


def test_save_adapter_holds_only_lora_tensors(reference, tmp_path):
    _, base = reference
    settings = LoraSettings(rank=4, targets=("q_proj", "blocks.1.mlp.*"), dora=True)
    model = apply_lora(copy.deepcopy(base), settings)
    randomize_adapter(model)
    save_adapter(model, tmp_path, "lora", settings)
    method, saved_settings, tensors = read_adapter(tmp_path)
    assert method == "lora" and all(".lora_" in name for name in tensors)
    assert len(tensors) == 3 * (2 + 3)  # A, B, magnitude for 2 q_proj and block 1's gate, up and down
    restored = apply_lora(copy.deepcopy(base), LoraSettings(**saved_settings))
    load_trained_tensors(restored, tensors, tmp_path)
    assert torch.equal(logits(restored, token_ids()), logits(model, token_ids()))


def test_targets_select_by_name_and_glob(reference):
    _, base = reference
    model = copy.deepcopy(base)
    k_weight = model.blocks[0].attn.k_proj.weight
    apply_lora(model, LoraSettings(targets=("blocks.1.mlp.*", "attn.k_proj")))
    layer = model.blocks[0].attn.k_proj
    assert isinstance(layer, LoraLinear) and layer.weight is k_weight and layer.base is None  # taken over, no copy
    assert sorted(lora_layers(model)) == ["blocks.0.attn.k_proj", "blocks.1.attn.k_proj", "blocks.1.mlp.down_proj",
                                          "blocks.1.mlp.gate_proj", "blocks.1.mlp.up_proj"]
    assert "blocks.0.attn.k_proj.weight" in model.state_dict()  # the base names do not change
    assert torch.equal(logits(model, token_ids()), logits(base, token_ids()))  # B starts at zero


def test_lora_on_a_quantised_base():
    """An NF4 base (QLoRA's) is called as base(x); merging and DoRA need a float weight and refuse it."""
    torch.manual_seed(0)
    model = nn.Sequential(NF4Linear.from_linear(nn.Linear(64, 8)), nn.ReLU(), nn.Linear(8, 4))
    quantised = model[0]
    apply_lora(model, LoraSettings(rank=2, alpha=4.0, targets=("0",)))
    randomize_adapter(model)
    layer = model[0]
    assert layer.base is quantised and "0.base.weight_codes" in model.state_dict()
    x = torch.randn(3, 64)
    expected = quantised(x) + 2.0 * x @ layer.lora_A["default"].T @ layer.lora_B["default"].T
    assert difference(layer(x), expected) <= 1e-6
    model(x).sum().backward()
    assert layer.lora_A["default"].grad is not None and model[2].weight.grad is None
    with pytest.raises(LlmkitError, match=r"merging LoRA needs the float weight of 0, but it is a quantised "
                                          r"NF4Linear; load the model unquantised"):
        merge_lora(model)
    with pytest.raises(LlmkitError, match=r"merge_and_unload needs the float weight of 0, .*keep base and adapter separate"):
        merge_and_unload(model)
    with pytest.raises(LlmkitError, match=r"DoRA needs the float weight of 0, .*or use plain LoRA \(dora=False\)"):
        add_adapter(model, LoraSettings(targets=("0",), dora=True, adapter_name="dora"))




def test_gaussian_init_and_import_beside_an_existing_adapter(reference, tmp_path):
    hf_model, base = reference
    model = apply_lora(copy.deepcopy(base), LoraSettings(rank=4, init="gaussian"))
    a_matrix = model.blocks[0].mlp.up_proj.lora_A["default"]
    assert 0.15 < a_matrix.std().item() < 0.35  # N(0, 1/rank) = N(0, 0.25); peft's "gaussian"
    assert not model.blocks[0].mlp.up_proj.lora_B["default"].any()
    torch.manual_seed(4)
    peft_model = get_peft_model(copy.deepcopy(hf_model), LoraConfig(r=2, target_modules=["v_proj"],
                                                                     init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path)
    import_peft_lora(model, tmp_path, adapter_name="imported")
    assert adapter_names(model) == ["default", "imported"]
    assert model.blocks[0].attn.v_proj.active == "imported" and model.blocks[0].attn.q_proj.active is None
    assert difference(logits(model, token_ids()), logits(peft_model, token_ids())) <= TOLERANCE


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("changes, message", [
    ({"rank": 0}, r"LoRA rank=0 must be a positive integer"),
    ({"alpha": 0.0}, r"LoRA alpha=0.0 must be positive"),
    ({"dropout": 1.0}, r"LoRA dropout=1.0 must be in \[0, 1\)"),
    ({"init": "xavier"}, r"LoRA init='xavier' is unknown; choose one of kaiming, gaussian"),
    ({"targets": ()}, r"LoRA targets is empty; name the linear layers to adapt"),
    ({"adapter_name": "a.b"}, r"adapter_name='a.b' must be a Python identifier"),
])
def test_bad_settings(changes, message):
    with pytest.raises(LlmkitError, match=message):
        LoraSettings(**changes)


def test_model_level_errors(reference):
    _, base = reference
    with pytest.raises(LlmkitError, match=r"LoRA targets \['qproj'\] match no linear layer; the model's linear layers "
                                          r"are named like \['blocks.0.attn.q_proj'"):
        apply_lora(copy.deepcopy(base), LoraSettings(targets=("qproj",)))
    with pytest.raises(LlmkitError, match=r"the model has no LoRA layers; call apply_lora"):
        merge_lora(copy.deepcopy(base))
    model = apply_lora(copy.deepcopy(base), LoraSettings(targets=("q_proj",)))
    with pytest.raises(LlmkitError, match=r"already has LoRA adapters \['default'\]; add another with add_adapter"):
        apply_lora(model, LoraSettings())
    with pytest.raises(LlmkitError, match=r"already has an adapter named 'default'; choose another adapter_name"):
        add_adapter(model, LoraSettings())
    with pytest.raises(LlmkitError, match=r"the model has no adapter 'nope'; it has \['default'\]"):
        set_adapter(model, "nope")
    merge_lora(model)
    with pytest.raises(LlmkitError, match=r"cannot switch to adapter 'default' while one is merged.*unmerge_lora"):
        set_adapter(model, "default")
    with pytest.raises(LlmkitError, match=r"cannot add adapter 'other' while another is merged.*unmerge_lora"):
        add_adapter(model, LoraSettings(adapter_name="other"))


def test_export_errors(reference, tmp_path):
    _, base = reference
    with pytest.raises(LlmkitError, match=r"the model has no LoRA adapter to export; apply_lora"):
        export_peft_lora(copy.deepcopy(base), tmp_path)
    with pytest.raises(LlmkitError, match=r"the model has no adapter 'nope' to export; it has \['default'\]"):
        export_peft_lora(apply_lora(copy.deepcopy(base), LoraSettings()), tmp_path, adapter_name="nope")
    plain = apply_lora(nn.Sequential(nn.Linear(4, 4)), LoraSettings(targets=("0",)))
    with pytest.raises(LlmkitError, match=r"a Sequential has no llmkit config; .* pass a Decoder"):
        export_peft_lora(plain, tmp_path)


@pytest.fixture
def peft_directory(reference, tmp_path) -> Path:
    """An exported LoRA (r=4 on q_proj and v_proj) to tamper with."""
    export_peft_lora(lora_model(reference[1], targets=("q_proj", "v_proj")), tmp_path / "adapter")
    return tmp_path / "adapter"


def rewrite_config(directory: Path, **changes) -> None:
    record = json.loads((directory / PEFT_CONFIG_FILE).read_text())
    (directory / PEFT_CONFIG_FILE).write_text(json.dumps({**record, **changes}))


def rewrite_tensors(directory: Path, change) -> None:
    tensors = load_file(directory / PEFT_WEIGHTS_FILE)
    save_file(change(tensors), directory / PEFT_WEIGHTS_FILE)


Q_KEY = "base_model.model.model.layers.0.self_attn.q_proj"
TAMPERINGS = {
    "peft type": (lambda d: rewrite_config(d, peft_type="IA3"), r"has peft_type 'IA3'; only 'LORA' adapters import"),
    "bias": (lambda d: rewrite_config(d, bias="all"), r"sets bias='all'; llmkit imports plain LoRA/DoRA only"),
    "modules to save": (lambda d: rewrite_config(d, modules_to_save=["lm_head"]),
                        r"sets modules_to_save=\['lm_head'\]; llmkit imports plain LoRA/DoRA only"),
    "llmkit adapter": (lambda d: rewrite_config(d, method="lora"), r"is an llmkit adapter \(method 'lora'\), not a PEFT"),
    "pickle": (lambda d: ((d / PEFT_WEIGHTS_FILE).rename(d / "adapter_model.bin")),
               r"holds only adapter_model.bin \(pickled\); llmkit never unpickles"),
    "truncated": (lambda d: (d / PEFT_WEIGHTS_FILE).write_bytes(b"\x08\x00"), r"adapter_model.safetensors is missing "
                                                                              r"or unreadable .*save the adapter again"),
    "stray tensor": (lambda d: rewrite_tensors(d, lambda t: {**t, "base_model.model.lm_head.weight": torch.zeros(2)}),
                     r"unexpected tensor base_model.model.lm_head.weight in .*a PEFT LoRA file holds"),
    "other model": (lambda d: rewrite_tensors(d, lambda t: {k.replace("layers.1.", "layers.7."): v for k, v in t.items()}),
                    r"adapts model.layers.7.self_attn.q_proj, which is no linear layer llmkit maps"),
    "empty": (lambda d: rewrite_tensors(d, lambda t: {}), r"holds no tensors; export the adapter again"),
    "dora without magnitude": (lambda d: rewrite_config(d, use_dora=True),
                               r"holds \['A', 'B'\] for blocks.0.attn.q_proj but use_dora=True needs "
                               r"\['A', 'B', 'magnitude'\]"),
    "rank": (lambda d: rewrite_config(d, r=2), rf"{Q_KEY}.lora_A.weight in .* has shape \(4, 32\), "
                                               r"blocks.0.attn.q_proj with r=2 needs \(2, 32\)"),
}


@pytest.mark.parametrize("case", list(TAMPERINGS))
def test_import_errors(case, peft_directory, reference):
    tamper, message = TAMPERINGS[case]
    tamper(peft_directory)
    model = copy.deepcopy(reference[1])
    with pytest.raises(LlmkitError, match=message):
        import_peft_lora(model, peft_directory)
    assert not lora_layers(model)  # checked before the model changed


def test_import_needs_a_directory(reference, tmp_path):
    with pytest.raises(LlmkitError, match=r"missing is not a PEFT adapter directory; pass the folder holding "
                                          r"adapter_config.json"):
        import_peft_lora(copy.deepcopy(reference[1]), tmp_path / "missing")


@pytest.mark.slow
def test_smollm2_adapter_loads_in_peft(tmp_path):
    """Real weights: an llmkit LoRA on SmolLM2-135M, exported, gives the same logits under peft on transformers'
    model of the same weights (written with export_hf: transformers' own GGUF loading takes 10x longer)."""
    from transformers import AutoModelForCausalLM

    from llmkit.checkpoints import default_model_path, load_model

    model = load_model(default_model_path())
    export_hf(model, tmp_path / "base")
    apply_lora(model, LoraSettings(rank=8, targets=("q_proj", "v_proj", "down_proj")))
    randomize_adapter(model)
    export_peft_lora(model, tmp_path / "adapter")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    expected = logits(peft_model, ids)
    with peft_model.disable_adapter():
        assert difference(logits(peft_model, ids), expected) > 0.1  # the adapter moves the logits (size ~30)
    assert difference(logits(model, ids), expected) <= 1e-4  # fp32, 30 layers: summation order only
