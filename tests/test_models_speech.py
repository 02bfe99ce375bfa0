"""The Whisper-style speech model: parity with transformers' WhisperForConditionalGeneration on a tiny random config
(encoder output, decoder logits, greedy tokens), cached decoding, and learning on real FSDD recordings."""

import pytest
import torch

from llmkit.checkpoints.hf_whisper import load_hf_whisper
from llmkit.config import Config
from llmkit.data.fsdd import DIGIT_WORDS, DigitBatches, digit_tokenizer, load_recordings
from llmkit.errors import LlmkitError
from llmkit.generate.seq2seq import generate_seq2seq
from llmkit.models.speech import SpeechModel
from llmkit.train.objectives import seq2seq_loss

pytestmark = pytest.mark.usefixtures("one_thread")
START, END = 3, 2


def tiny_whisper(seed: int = 0):  # noqa: ANN201 (a transformers WhisperForConditionalGeneration)
    """A random tiny Whisper with non-zero biases (a fresh one's are zero, which would hide a misplaced bias)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    config = WhisperConfig(vocab_size=97, num_mel_bins=16, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                           d_model=32, max_source_positions=20, max_target_positions=24, pad_token_id=0,
                           bos_token_id=1, eos_token_id=END, decoder_start_token_id=START)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(std=0.2)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):  # noqa: ANN201
    """(transformers model, the same weights imported into llmkit)."""
    reference = tiny_whisper()
    directory = tmp_path_factory.mktemp("whisper")
    reference.save_pretrained(directory)
    config, state = load_hf_whisper(directory)
    model = SpeechModel(config)
    model.load_state_dict(state)
    return reference, model.eval()


def hf_greedy(reference, features: torch.Tensor, prompt: torch.Tensor, steps: int) -> torch.Tensor:  # noqa: ANN001
    """Greedy tokens from transformers' logits, the whole sequence re-run at every step (no cache)."""
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):
            logits = reference(input_features=features, decoder_input_ids=ids).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt.shape[1]:]


def test_encoder_output_and_decoder_logits_match_transformers(pair):
    reference, model = pair
    features = torch.randn(2, 16, 40)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        expected_states = reference.model.encoder(features).last_hidden_state
        expected_logits = reference(input_features=features, decoder_input_ids=ids).logits
        assert (model.encode(features) - expected_states).abs().max() <= 1e-4  # fp32, same operations
        assert (model(features, ids) - expected_logits).abs().max() <= 1e-4


def test_greedy_tokens_match_transformers_and_the_uncached_loop(pair):
    reference, model = pair
    features = torch.randn(3, 16, 40)
    prompt = torch.tensor([[START, 5, 6]] * 3)  # a multi-token prompt, as Whisper's task tokens are
    ours = generate_seq2seq(model, features, 10, decoder_prompt=prompt)
    assert torch.equal(ours, hf_greedy(reference, features, prompt, 10))
    ids = prompt
    with torch.no_grad():  # llmkit's own uncached loop: the full forward at every step
        for _ in range(10):
            ids = torch.cat([ids, model(features, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours, ids[:, 3:])


def test_generation_starts_from_decoder_start_id_and_stops(pair):
    reference, model = pair
    features = torch.randn(1, 16, 40)
    free = generate_seq2seq(model, features, 6)
    assert torch.equal(free, hf_greedy(reference, features, torch.full((1, 1), START), 6))
    stop = int(free[0, 2])
    first = free[0].tolist().index(stop)
    stopped = generate_seq2seq(model, features, 6, stop_ids={stop}, pad_id=0)
    assert torch.equal(stopped[0], free[0, : first + 1])  # ends at the stop token: every row (one here) stopped


def test_bad_inputs_name_the_shape_and_the_field():
    model = SpeechModel(Config(arch="speech", position="learned", vocab_size=20, d_model=32, n_mels=16,
                               n_audio_ctx=10, max_seq_len=8, norm="layernorm", mlp="gelu"))
    with pytest.raises(LlmkitError, match=r"input_features has shape \(1, 16, 30\).*\(batch, 16, 20\)"):
        model.encode(torch.randn(1, 16, 30))
    with pytest.raises(LlmkitError, match="arch='speech' .* uses learned decoder positions; set position='learned'"):
        Config(arch="speech", position="rope")
    with pytest.raises(LlmkitError, match="n_audio_ctx=0 must be a positive integer"):
        Config(arch="speech", position="learned", n_audio_ctx=0)


def test_a_short_training_run_on_real_recordings_learns_the_digits():
    """40 real recordings (2 speakers x 2 takes x 10 digits), 200 small steps with the one loop's objective: the model
    names most of the digits it trained on (chance: 10%), its digit loss falls far below chance's ln 10."""
    from llmkit.data.fsdd import digit_labels, features

    tokenizer = digit_tokenizer()
    recordings = load_recordings(("george", "jackson"), max_per_speaker=20)
    config = Config(name="t", arch="speech", vocab_size=tokenizer.vocab_size, n_layers=1, n_decoder_layers=1,
                    n_heads=2, d_model=48, max_seq_len=4, norm="layernorm", mlp="gelu", qkv_bias=True, out_bias=True,
                    mlp_bias=True, tie_embeddings=True, position="learned", n_mels=80, n_audio_ctx=50,
                    decoder_start_id=1, eos_id=tokenizer.eos_id)
    torch.manual_seed(0)
    model = SpeechModel(config)
    batches = DigitBatches(recordings, tokenizer, 80, 100, augmented=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    inputs = features([r.samples for r in recordings], 80, 100)
    labels = digit_labels([r.digit for r in recordings], tokenizer)[:, 0]  # (40,) the digit words' ids

    def digit_loss() -> float:
        with torch.no_grad():
            logits = model(inputs, torch.full((len(recordings), 1), config.decoder_start_id))[:, 0]
        return torch.nn.functional.cross_entropy(logits, labels).item()

    first = digit_loss()
    for step in range(200):
        loss = seq2seq_loss(model, batches(step * 16, 16)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    new = generate_seq2seq(model, inputs, 2, stop_ids={tokenizer.eos_id})
    words = [tokenizer.decode(row[:1].tolist()) for row in new]
    accuracy = sum(word == DIGIT_WORDS[r.digit] for word, r in zip(words, recordings)) / len(recordings)
    assert first > 2.0 and digit_loss() < 1.0  # ln 10 = 2.30 is chance
    assert accuracy >= 0.5


def test_an_ensemble_decodes_by_the_mean_of_its_members_log_probabilities(pair):
    """Two members (the imported model and a second random one): greedy tokens equal a hand-written uncached loop
    over the mean of their log-softmaxes; a list of one model decodes as that model; differing vocabularies or start
    ids are refused."""
    _, first = pair
    config, state = first.config, first.state_dict()
    torch.manual_seed(1)
    second = SpeechModel(config).eval()
    features = torch.randn(3, 16, 40)
    prompt = torch.tensor([[START, 5]] * 3)
    ours = generate_seq2seq([first, second], features, 8, decoder_prompt=prompt)
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            scores = sum(m(features, ids)[:, -1].log_softmax(-1) for m in (first, second)) / 2  # (B, V)
            ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours, ids[:, 2:])
    alone = [generate_seq2seq(m, features, 8, decoder_prompt=prompt) for m in (first, second)]
    assert not torch.equal(alone[0], alone[1])  # the members disagree, so the mean decides something
    assert torch.equal(generate_seq2seq([first], features, 8, decoder_prompt=prompt), alone[0])
    import dataclasses

    other = SpeechModel(dataclasses.replace(config, vocab_size=config.vocab_size + 1)).eval()
    with pytest.raises(LlmkitError, match="must share one vocabulary and decoder start id"):
        generate_seq2seq([first, other], features, 2)
    with pytest.raises(LlmkitError, match="empty list of models"):
        generate_seq2seq([], features, 2)
    assert torch.equal(first.state_dict()["embed.weight"], state["embed.weight"])  # the shared fixture is untouched


def test_each_member_may_read_its_own_input(pair):
    """One model over two inputs (test-time augmentation's speed copies): greedy tokens equal a hand-written
    uncached loop over the mean of its log-softmaxes on each input; inputs that do not pair with the models are
    refused."""
    torch.manual_seed(0)
    model = SpeechModel(pair[1].config).eval()
    with torch.no_grad():  # larger weights than an initialised model's, so the decoder's choices follow its input
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(std=0.3)
    torch.manual_seed(1)
    a, b = torch.randn(3, 16, 40), torch.randn(3, 16, 40)
    prompt = torch.tensor([[START, 5]] * 3)
    ours = generate_seq2seq([model, model], [a, b], 8, decoder_prompt=prompt)
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            scores = (model(a, ids)[:, -1].log_softmax(-1) + model(b, ids)[:, -1].log_softmax(-1)) / 2  # (B, V)
            ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours, ids[:, 2:])
    alone = [generate_seq2seq(model, x, 8, decoder_prompt=prompt) for x in (a, b)]
    assert not torch.equal(alone[0], alone[1]) and not torch.equal(ours, alone[0])  # both inputs count
    with pytest.raises(LlmkitError, match="got 1 inputs with batch sizes \\[3\\] for 2 models"):
        generate_seq2seq([model, model], [a], 2)
    with pytest.raises(LlmkitError, match="batch sizes \\[2, 3\\] for 2 models"):
        generate_seq2seq([model, model], [a, b[:2]], 2)
