"""The `llmkit` command: help texts, readable errors, and the verbs end to end."""

import pytest
import torch

from llmkit.checkpoints import default_model_path, load_model
from llmkit.cli import COMMANDS
from tests.helpers import run_cli

VERBS = sorted([f"{group} {name}" for group, verbs in COMMANDS.items() if isinstance(verbs, dict) for name in verbs]
               + [verb for verb, function in COMMANDS.items() if not isinstance(function, dict)])


def test_verb_groups_are_listed():
    assert "tokenizer train" in VERBS and "pretrain" in VERBS


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help_with_an_example(capsys, verb):
    code, out, _ = run_cli(capsys, *verb.split(), "--help")
    assert code == 0
    assert "Example:" in out and f"llmkit {verb}" in out


def test_help_never_imports_torch():
    """`--help` of any verb (and of `llmkit` itself) stays under a second: neither jsonargparse's reading of a verb's
    signature nor the verb's module may pull in torch (1+ s). A fresh interpreter, since this one has torch loaded."""
    import subprocess
    import sys

    script = ("import contextlib, io, sys\nfrom llmkit.cli import main\nfor argv in sys.argv[1:]:\n"
              "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
              "        main([*argv.split(), '--help'])\n"
              "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script, "", *VERBS], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


@pytest.mark.parametrize(("environment", "spin_count"), [({}, "10000"), ({"GOMP_SPINCOUNT": "5"}, "5"),
                                                          ({"OMP_WAIT_POLICY": "ACTIVE"}, None)])
def test_cli_shortens_openmp_spinning_unless_the_user_chose(environment, spin_count):
    """The CLI sets GOMP_SPINCOUNT before torch loads libgomp (which reads it once), unless the user set it or a
    wait policy; a fresh interpreter, as the setting only takes before torch is imported."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    script = ("import os, sys\nimport llmkit.cli\nimport torch\n"
              "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={**env, **environment})
    assert result.stdout.split() == [str(spin_count), "True"], result.stderr


def test_info_on_a_preset(capsys):
    code, out, _ = run_cli(capsys, "info", "--model", "gpt2")
    assert code == 0
    assert "124,439,808" in out and "learned" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (("info", "--model", "no/such/dir"), "no/such/dir does not exist"),
        (("generate", "--prompt", "[hi]", "--model", "README.md"), "is a file but not a .gguf file"),
        (("convert", "--model", "tests", "--output", "x"), "holds no config.json"),
        (("generate", "--prompt", "[hi]", "--device", "cuda:0"), "CUDA is not available"),
    ],
)
def test_bad_input_prints_one_line_and_exits_2(capsys, monkeypatch, argv, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CUDA error must show on GPU machines too
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_help_builds_only_the_chosen_verbs_options():
    from llmkit.cli import build_parser

    def options(parser, *verbs: str) -> set[str]:
        for verb in verbs:
            parser = parser._subcommands_action._name_parser_map[verb]
        return set(parser._option_string_actions)

    for_info = build_parser(["info", "--help"])
    assert "--model" in options(for_info, "info")
    assert not any(flag.startswith(("--train.", "--lora.")) for flag in options(for_info, "info"))
    assert "--train.max_steps" not in options(for_info, "finetune")  # listed, but its flags are not built
    for_finetune = build_parser(["finetune", "--help"])
    assert {"--lora.rank", "--train.device", "--prefix.n_virtual_tokens"} <= options(for_finetune, "finetune")
    assert "--data" in options(build_parser(["tokenizer", "train"]), "tokenizer", "train")


def convert_error(capsys, model, output, *extra: str) -> str:
    code, _, err = run_cli(capsys, "convert", "--model", str(model), "--output", str(output), *extra)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_convert_never_replaces_another_models_files(tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"another": "model"}')
    err = convert_error(capsys, default_model_path(), other)
    assert err == (f"error: --output {other} already holds files (config.json); pass --overwrite to replace them, or "
                   "choose a new or empty directory\n")
    assert (other / "config.json").read_text() == '{"another": "model"}'
    (tmp_path / "weights.bin").write_text("a file")
    assert "is a file; pass a directory" in convert_error(capsys, default_model_path(), tmp_path / "weights.bin",
                                                          "--overwrite", "true")
    assert "same as --model or inside it" in convert_error(capsys, other, other / "converted", "--overwrite", "true")
    assert "same as --model or inside it" in convert_error(capsys, other, tmp_path / "." / "other", "--overwrite", "true")
    assert (tmp_path / "weights.bin").read_text() == "a file" and not (other / "converted").exists()


@pytest.mark.slow
def test_chat_answers_a_factual_question(capsys):
    code, out, _ = run_cli(capsys, "chat", "--message", "What is the capital of France?", "--max_new_tokens", "30")
    assert code == 0
    assert "Paris" in out


@pytest.mark.slow
def test_convert_gguf_to_native_and_hf(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "convert", "--model", str(default_model_path()), "--output", str(tmp_path / "native"))
    assert code == 0 and "134,515,008 parameters" in out
    code, _, _ = run_cli(capsys, "convert", "--model", str(tmp_path / "native"), "--output", str(tmp_path / "hf"),
                         "--to", "hf")
    assert code == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(tmp_path / "native")
    tokens = AutoTokenizer.from_pretrained(tmp_path / "hf")("The weather today is", return_tensors="pt").input_ids
    with torch.no_grad():
        # same fp32 weights in both; 1e-3 covers summation-order differences over 30 layers
        assert (reference(tokens).logits - ours(tokens)).abs().max() < 1e-3


@pytest.mark.slow
def test_generate_one_prompt_and_a_batch(capsys):
    code, out, _ = run_cli(capsys, "generate", "--prompt", "The capital of Italy is", "--max_new_tokens", "5")
    assert code == 0 and "Rome" in out
    code, out, _ = run_cli(capsys, "generate", "--prompt", "[The capital of Italy is, Water boils at]",
                           "--max_new_tokens", "8", "--stop", "[.]")
    assert code == 0
    first, second = out.split("--- [1]")
    assert "Rome" in first and "100" in second


NOT_UTF8 = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # what Python makes of Latin-1 bytes in argv


@pytest.mark.parametrize(
    "argv, flag",
    [
        (("generate", "--prompt", NOT_UTF8), "--prompt"),
        (("chat", "--message", NOT_UTF8), "--message"),
        (("chat", "--message", "hi", "--system", NOT_UTF8), "--system"),
    ],
)
def test_text_that_is_not_utf8_is_one_clear_error(capsys, argv, flag):
    """Bytes that are not UTF-8 in argv reached the tokenizer as lone surrogates: 'TypeError: TextInputSequence must
    be str' with a traceback."""
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"error: {flag} holds bytes that are not UTF-8 (byte b'\\xe9' at character 3)" in err and "iconv" in err
