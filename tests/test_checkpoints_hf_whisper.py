"""Hugging Face Whisper checkpoints in and out (WhisperForConditionalGeneration), through load_model and export_hf, and
the `llmkit speech transcribe` verb's handling of models and bad input."""

import struct
import wave

import pytest
import torch

from llmkit.checkpoints import load_model, load_weights, save_model
from llmkit.checkpoints.hf import export_hf
from llmkit.config import Config
from llmkit.data.audio import apply_feature_norm
from llmkit.data.fsdd import digit_tokenizer
from llmkit.errors import LlmkitError
from llmkit.models.speech import SpeechModel
from tests.helpers import cli_status, run_cli, tiny_decoder
from tests.test_models_speech import tiny_whisper

pytestmark = pytest.mark.usefixtures("one_thread")


def speech_config(**overrides) -> Config:  # noqa: ANN003
    fields = dict(name="tiny-speech", arch="speech", vocab_size=12, n_layers=2, n_decoder_layers=1, n_heads=4,
                  d_model=32, d_ff=64, max_seq_len=16, norm="layernorm", mlp="gelu", qkv_bias=True, out_bias=True,
                  mlp_bias=True, tie_embeddings=True, position="learned", n_mels=80, n_audio_ctx=50,
                  decoder_start_id=1, eos_id=0)
    return Config(**{**fields, **overrides})


def random_speech_model(seed: int = 0, **overrides) -> SpeechModel:  # noqa: ANN003
    """Random weights everywhere, biases included (the key bias too: export must drop it and stay exact)."""
    torch.manual_seed(seed)
    model = SpeechModel(speech_config(**overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(std=0.2)
    return model.eval()


def write_wav(path, samples, rate=8000, channels=1, width=2):  # noqa: ANN001, ANN201
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes(struct.pack(f"<{len(samples)}{'h' if width == 2 else 'B'}", *samples))
    return path


def test_a_transformers_whisper_directory_loads_with_the_same_outputs(tmp_path):
    reference = tiny_whisper(seed=1)
    reference.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert isinstance(model, SpeechModel) and model.config.hf_architecture == "WhisperForConditionalGeneration"
    features, ids = torch.randn(2, 16, 40), torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        expected = reference(input_features=features, decoder_input_ids=ids).logits
        assert (model(features, ids) - expected).abs().max() <= 1e-4
    assert not model.encoder.blocks[0].attn.k_proj.bias.any()  # Whisper's keys have no bias: imported as zero


@pytest.mark.parametrize("tied", [True, False])
def test_export_loads_in_transformers_with_the_same_outputs_and_imports_back(tmp_path, tied):
    from transformers import WhisperForConditionalGeneration

    model = random_speech_model(tie_embeddings=tied)
    export_hf(model, tmp_path)
    reference = WhisperForConditionalGeneration.from_pretrained(tmp_path).eval()
    features, ids = torch.randn(2, 80, 100), torch.randint(0, 12, (2, 5))
    with torch.no_grad():
        ours = model(features, ids)
        # the dropped key bias (random here) shifts each query's scores alike: the softmax cancels it
        assert (reference(input_features=features, decoder_input_ids=ids).logits - ours).abs().max() <= 1e-4
    config, state = load_weights(tmp_path)
    assert config.tie_embeddings == tied and config.n_audio_ctx == 50 and config.n_decoder_layers == 1
    back = SpeechModel(config)
    back.load_state_dict(state)
    with torch.no_grad():
        assert (back.eval()(features, ids) - ours).abs().max() <= 1e-4


def test_native_checkpoint_round_trip(tmp_path):
    model = random_speech_model()
    save_model(model, tmp_path, tokenizer=digit_tokenizer())
    loaded = load_model(tmp_path, arch="speech")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_utterance_normalisation_is_saved_and_applied_by_transcribe(tmp_path, monkeypatch):
    """feature_norm="utterance" and "speech" survive a native save and load, transcribe feeds the model features
    normalised as the config says (and Whisper's as they are for the default), and HF export refuses both: Whisper's
    config.json cannot say them."""
    import llmkit.generate.seq2seq as seq2seq
    from llmkit.checkpoints import load_tokenizer
    from llmkit.commands.speech import transcribe

    seen = []
    generate = seq2seq.generate_seq2seq
    monkeypatch.setattr(seq2seq, "generate_seq2seq", lambda model, inputs, *a, **k: (
        seen.append(inputs[0]), generate(model, inputs, *a, **k))[1])  # one model, one speed: one input
    clip = torch.sin(torch.arange(8000) / 7.0) * torch.linspace(0.0, 0.5, 8000)
    for norm in ("utterance", "whisper", "speech"):
        save_model(random_speech_model(feature_norm=norm), tmp_path / norm, tokenizer=digit_tokenizer())
        loaded = load_model(tmp_path / norm, arch="speech")
        assert loaded.config.feature_norm == norm
        transcribe(loaded, load_tokenizer(tmp_path / norm), [clip])
    channel_means = [inputs.mean(dim=-1).abs().max().item() for inputs in seen]
    assert channel_means[0] < 1e-4 and channel_means[1] > 0.1
    # the clip fades in from silence: its first frames fall below the speech gate, so "speech" differs from "utterance"
    torch.testing.assert_close(seen[2], apply_feature_norm(seen[1], "speech"))
    assert (seen[2] - seen[0]).abs().max() > 0.1
    for norm in ("utterance", "speech"):
        with pytest.raises(LlmkitError, match=f"no way to say feature_norm='{norm}'"):
            export_hf(random_speech_model(feature_norm=norm), tmp_path / "hf", tokenizer=digit_tokenizer())


def test_a_whisper_config_llmkit_cannot_compute_is_refused(tmp_path):
    reference = tiny_whisper()
    reference.config.activation_function = "relu"
    reference.save_pretrained(tmp_path)
    with pytest.raises(LlmkitError, match="activation_function='relu'.*computes Whisper's 'gelu'"):
        load_model(tmp_path)


def test_transcribe_runs_an_exported_model_and_names_bad_inputs(tmp_path, capsys):
    """The verb on an HF Whisper directory with a word-level tokenizer: one line per file; then each bad input is one
    `error:` line naming the flag."""
    model_dir = tmp_path / "whisper"
    export_hf(random_speech_model(), model_dir, tokenizer=digit_tokenizer())
    clip = write_wav(tmp_path / "tone.wav", [int(8000 * ((i // 20) % 2) - 4000) for i in range(4000)])
    code, out, _ = run_cli(capsys, "speech", "transcribe", "--model", str(model_dir), "--files", f"[{clip}]")
    assert code == 0 and out.startswith(f"{clip}\t")
    from llmkit.checkpoints import load_tokenizer
    from llmkit.commands.speech import transcribe
    from llmkit.data.audio import load_audio

    expected = transcribe(load_model(model_dir), load_tokenizer(model_dir), [load_audio(clip)])[0]
    assert out == f"{clip}\t{expected}\n"

    stereo = write_wav(tmp_path / "stereo.wav", [0, 0, 1, 1], channels=2)
    text = tmp_path / "text.wav"
    text.write_text("hello")
    decoder_dir = tmp_path / "decoder"
    save_model(tiny_decoder(), decoder_dir)
    for files, model, message in [
        (str(tmp_path / "missing.wav"), model_dir, "--files: .*missing.wav does not exist"),
        (str(stereo), model_dir, "--files: .*stereo.wav is 2-channel 16-bit audio"),
        (str(text), model_dir, "--files: .*text.wav is not a PCM WAV file"),
        (str(clip), decoder_dir, "--model: .*holds a decoder model .* this needs a speech model"),
        (str(clip), tmp_path / "nowhere", "--model .*nowhere does not exist"),
    ]:
        code, err = cli_status(capsys, "speech", "transcribe", "--model", str(model), "--files", f"[{files}]")
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith("error: ") and __import__("re").search(message, err), err


@pytest.mark.parametrize(("flags", "message"), [
    (["--vtlp", "1.5"], r"--vtlp 1.5 must be in \[0, 1\)"),
    (["--validation_speaker", "theo"], "--validation_speaker theo is not a training speaker; pick one of george"),
    (["--n_frames", "99"], "--n_frames 99 must be an even number"),
])
def test_speech_train_names_a_bad_flag_before_reading_any_audio(tmp_path, capsys, flags, message):
    code, err = cli_status(capsys, "speech", "train", "--output", str(tmp_path / "run"), *flags)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and __import__("re").search(message, err)


def test_transcribe_with_several_models_decodes_them_as_one_ensemble(tmp_path, capsys):
    """--model "[a, b]": the transcript of the two models' ensemble (llmkit.generate.seq2seq), whichever order they
    come in, though the two alone disagree; models that read other features, or an empty list, are one error line
    each."""
    from llmkit.checkpoints import load_tokenizer
    from llmkit.commands.speech import transcribe
    from llmkit.data.audio import load_audio

    # random models that answer "two" and "five" (seeds 0 and 2), and one reading normalised features
    for name, seed, norm in (("a", 0, "whisper"), ("b", 2, "whisper"), ("c", 3, "utterance")):
        save_model(random_speech_model(seed, feature_norm=norm), tmp_path / name, tokenizer=digit_tokenizer())
    clips = [write_wav(tmp_path / f"{i}.wav", [int(6000 * ((j // (10 + 7 * i)) % 2) - 3000) for j in range(4000)])
             for i in range(3)]
    files = "[" + ", ".join(map(str, clips)) + "]"
    tokenizer = load_tokenizer(tmp_path / "a")
    audio = [load_audio(clip) for clip in clips]
    members = [load_model(tmp_path / name, arch="speech") for name in ("a", "b")]
    singles = [transcribe(member, tokenizer, audio, max_new_tokens=3) for member in members]
    assert singles[0] != singles[1]
    expected = "".join(f"{clip}\t{text}\n" for clip, text in zip(clips, transcribe(members, tokenizer, audio, 3)))
    for first, second in (("a", "b"), ("b", "a")):  # symmetric; the first model alone would answer as it does alone
        code, out, _ = run_cli(capsys, "speech", "transcribe", "--model", f"[{tmp_path / first}, {tmp_path / second}]",
                               "--files", files, "--max_new_tokens", "3")
        assert code == 0 and out == expected, out
    for model, message in [(f"[{tmp_path / 'a'}, {tmp_path / 'c'}]", "must read the same features"),
                           ("[]", "--model is an empty list")]:
        code, err = cli_status(capsys, "speech", "transcribe", "--model", model, "--files", files)
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_transcribe_at_several_speeds_decodes_the_copies_as_one_ensemble(tmp_path, capsys, monkeypatch):
    """--speeds "[0.9, 1.1]": the model's transcript over the two speed copies of each clip decoded as one ensemble
    (what transcribe computes: checked against generate_seq2seq on the copies' features); speeds (1.0,) is the
    plain transcript; speeds outside [0.5, 2] or none are one error line."""
    import llmkit.generate.seq2seq as seq2seq
    from llmkit.checkpoints import load_tokenizer
    from llmkit.commands.speech import decoder_prompt, transcribe
    from llmkit.data.audio import change_speed, load_audio
    from llmkit.data.fsdd import features
    from llmkit.generate.seq2seq import generate_seq2seq

    save_model(random_speech_model(0), tmp_path / "a", tokenizer=digit_tokenizer())
    clips = [write_wav(tmp_path / f"{i}.wav", [int(6000 * ((j // (10 + 7 * i)) % 2) - 3000) for j in range(4000)])
             for i in range(4)]
    model, tokenizer = load_model(tmp_path / "a", arch="speech"), load_tokenizer(tmp_path / "a")
    audio = [load_audio(clip) for clip in clips]
    config = model.config
    copies = [features([change_speed(x, speed) for x in audio], config.n_mels, 2 * config.n_audio_ctx,
                       config.feature_norm) for speed in (0.9, 1.1)]
    prompt = torch.tensor([decoder_prompt(tokenizer, config)] * len(audio))
    new = generate_seq2seq([model, model], copies, 3, stop_ids={config.eos_id}, decoder_prompt=prompt,
                           pad_id=config.eos_id)
    expected = [tokenizer.decode(row.tolist(), skip_special_tokens=True).strip() for row in new]
    seen = []
    generate = seq2seq.generate_seq2seq
    monkeypatch.setattr(seq2seq, "generate_seq2seq", lambda models, inputs, *a, **k: (
        seen.append((models, inputs)), generate(models, inputs, *a, **k))[1])
    assert transcribe(model, tokenizer, audio, 3, speeds=(0.9, 1.1)) == expected
    (models, inputs), = seen  # what was decoded: the model once per speed, over that speed's copies
    assert models == [model, model] and all(torch.equal(x, y) for x, y in zip(inputs, copies, strict=True))
    plain = transcribe(model, tokenizer, audio, 3)
    assert transcribe(model, tokenizer, audio, 3, speeds=(1.0,)) == plain
    assert torch.equal(seen[1][1][0], features(audio, config.n_mels, 2 * config.n_audio_ctx, config.feature_norm))
    files = "[" + ", ".join(map(str, clips)) + "]"
    code, out, _ = run_cli(capsys, "speech", "transcribe", "--model", str(tmp_path / "a"), "--files", files,
                           "--max_new_tokens", "3", "--speeds", "[0.9, 1.1]")
    assert code == 0 and out == "".join(f"{clip}\t{text}\n" for clip, text in zip(clips, expected)), out
    for speeds in ("[0.4, 1.0]", "[]"):
        code, err = cli_status(capsys, "speech", "transcribe", "--model", str(tmp_path / "a"), "--files", files,
                               "--speeds", speeds)
        assert code == 2 and err.count("\n") == 1 and "must be a non-empty list of factors in [0.5, 2]" in err, err


def test_speech_train_ensemble_trains_one_member_per_seed_and_reports_their_ensemble(tmp_path, capsys):
    """--ensemble 2 (a few steps of a tiny model, validated on one training voice): member-0/ and member-1/ are two
    runs from seeds train.seed and train.seed + 1 with their own weights; heldout.json gives each member alone and
    the ensemble's accuracy, which is the accuracy of the two loaded checkpoints decoded together; a second call
    resumes: nothing retrains."""
    import json

    from llmkit.checkpoints import load_tokenizer
    from llmkit.commands.speech import digit_accuracy
    from llmkit.data.fsdd import load_recordings
    from llmkit.train.settings import TrainSettings

    flags = ["speech", "train", "--output", str(tmp_path / "run"), "--ensemble", "2", "--validation_speaker", "george",
             "--d_model", "32", "--n_layers", "1", "--train.max_steps", "3", "--train.batch_size", "8",
             "--train.warmup_steps", "1"]
    code, out, _ = run_cli(capsys, *flags)
    assert code == 0, out
    report = json.loads((tmp_path / "run" / "heldout.json").read_text())
    seed = TrainSettings().seed
    assert [m["seed"] for m in report["members"]] == [seed, seed + 1]
    assert [m["checkpoint"] for m in report["members"]] == report["checkpoint"]
    assert all(f"member-{k}" in path for k, path in enumerate(report["checkpoint"]))
    members = [load_model(path, arch="speech") for path in report["checkpoint"]]
    assert not torch.equal(members[0].embed.weight, members[1].embed.weight)
    recordings = load_recordings(("george",))
    together = digit_accuracy(members, load_tokenizer(report["checkpoint"][0]), recordings)
    assert report["accuracy"] == together["all"] and report["per_speaker"] == {"george": together["george"]}
    assert f"ensemble member 2/2: seed {seed + 1}" in out and "validation digit accuracy of the 2-model ensemble" in out
    code, again, _ = run_cli(capsys, *flags)
    assert code == 0 and again.count("already trained to step 3") == 2
    assert json.loads((tmp_path / "run" / "heldout.json").read_text()) == report
    code, err = cli_status(capsys, *flags[:4], "--ensemble", "0")
    assert code == 2 and "--ensemble 0 must be at least 1" in err
