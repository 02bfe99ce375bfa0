"""Distillation through the training loop: every-other-layer students, the teacher-logit cache, GKD's on-policy
switch, a distilled student beating the same student trained without its teacher, and the verb's errors."""

from __future__ import annotations

import pytest
import torch

import llmkit.distill.objective as objective_module
from llmkit.checkpoints import save_model
from llmkit.config import Config
from llmkit.data.templates import FieldMap
from llmkit.distill.cache import TeacherLogitCache
from llmkit.distill.data import (
    TokensInMemory,
    held_out_batches,
    split_held_out,
    tokenize_documents,
    window_batches,
)
from llmkit.distill.encoder import SentenceDistillation, sentence_batches
from llmkit.distill.objective import DecoderDistillation
from llmkit.distill.settings import DistillSettings
from llmkit.distill.student import every_other_layer_indices, student_from, student_from_layers
from llmkit.errors import LlmkitError
from llmkit.models.encoder import Encoder, SentenceSettings, pool
from llmkit.train.loop import train
from llmkit.train.objectives import causal_lm_loss
from llmkit.train.settings import TrainSettings
from tests.helpers import byte_tokenizer, cli_status, shakespeare_text, tiny_decoder

SEQ_LEN = 64


def quiet(max_steps: int, **overrides) -> TrainSettings:
    values = dict(max_steps=max_steps, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=0, log_every=1000,
                  checkpoint_every=10_000, weight_decay=0.0)
    return TrainSettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def text_tokens() -> tuple[TokensInMemory, TokensInMemory]:
    ids = tokenize_documents(byte_tokenizer(), [shakespeare_text()[:60_000]])
    return split_held_out(ids, 0.1, SEQ_LEN)


@pytest.fixture(scope="module")
def teacher(text_tokens, tmp_path_factory):
    """A 4-layer byte-level decoder pretrained for 150 steps on Tiny Shakespeare (held-out loss ~2.3 nats)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny_decoder("tiny-llama", n_layers=4).train()
    train(model, causal_lm_loss, window_batches(text_tokens[0], SEQ_LEN, seed=0), quiet(150),
          tmp_path_factory.mktemp("teacher"))
    torch.set_num_threads(threads)
    return model.eval()


def held_out_loss(model: torch.nn.Module, tokens: TokensInMemory) -> float:
    model.eval()
    total = count = 0
    with torch.no_grad():
        for batch in held_out_batches(tokens, SEQ_LEN, 8, max_batches=8)():
            terms = causal_lm_loss(model, batch)
            total, count = total + terms.total.item(), count + terms.tokens.item()
    return total / count


def test_every_other_layer_student_holds_the_teachers_chosen_layers_exactly():
    teacher = tiny_decoder("tiny-llama", n_layers=5)
    student = student_from_layers(teacher, every_other_layer_indices(5))
    assert every_other_layer_indices(5) == [0, 2, 4] and student.config.n_layers == 3
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 2, 4]):
        for name, tensor in student.blocks[new].state_dict().items():
            assert torch.equal(tensor, teacher_state[f"blocks.{old}.{name}"])
    for name in ("embed.weight", "final_norm.weight"):
        assert torch.equal(student_state[name], teacher_state[name])
    assert student.training and teacher.blocks[0].attn.q_proj.weight.data_ptr() != \
        student.blocks[0].attn.q_proj.weight.data_ptr()  # a copy: training the student leaves the teacher alone
    # The student computes what the teacher computes with blocks 1 and 3 skipped.
    ids = torch.randint(0, 256, (2, 12))
    teacher.blocks = torch.nn.ModuleList(teacher.blocks[i] for i in [0, 2, 4])
    torch.testing.assert_close(student.eval()(ids), teacher(ids))


def test_every_other_layer_of_an_encoder_and_a_chosen_list():
    torch.manual_seed(0)
    teacher = Encoder(Config.from_name("tiny-bert", n_layers=6)).eval()
    student = student_from_layers(teacher, [1, 5])
    for new, old in enumerate([1, 5]):
        for name, tensor in student.blocks[new].state_dict().items():
            assert torch.equal(tensor, teacher.state_dict()[f"blocks.{old}.{name}"])
    with pytest.raises(LlmkitError, match=r"student layers \[0, 6\]"):
        student_from_layers(teacher, [0, 6])


def test_a_preset_student_takes_the_teachers_vocabulary_and_a_bad_name_is_refused():
    teacher = tiny_decoder("tiny-llama", vocab_size=300)
    assert student_from("tiny-llama", teacher).config.vocab_size == 300
    with pytest.raises(LlmkitError, match="--student nonsense: neither every_other"):
        student_from("nonsense", teacher)


def test_cached_teacher_logits_give_the_same_losses_as_on_the_fly(tmp_path, text_tokens, one_thread):
    teacher = tiny_decoder("tiny-llama", n_layers=2, seed=3)
    batches = window_batches(text_tokens[0], SEQ_LEN, seed=0)
    for top_k in (None, 5):
        settings = DistillSettings(loss="kl", temperature=2.0, alpha=0.5)
        on_the_fly = DecoderDistillation(teacher, settings, top_k=top_k)
        cache = TeacherLogitCache(tmp_path / "cache", teacher, top_k=top_k)
        cached = DecoderDistillation(teacher, settings, cache=cache)
        student = student_from_layers(teacher, [0])
        for position in (0, 8, 0):  # the third reads what the first wrote
            batch = batches(position, 4, 0, 1)
            assert cached(student, batch).total.item() == on_the_fly(student, batch).total.item()
        assert (cache.misses, cache.hits) == (2, 1)
        again = TeacherLogitCache(tmp_path / "cache", teacher, top_k=top_k)  # a later run: every batch is a hit
        DecoderDistillation(teacher, settings, cache=again)(student, batches(8, 4, 0, 1))
        assert (again.misses, again.hits) == (0, 1)
    other_teacher = tiny_decoder("tiny-llama", n_layers=2, seed=4)  # another teacher never reads these entries
    assert TeacherLogitCache(tmp_path / "cache", other_teacher).directory != cache.directory
    with pytest.raises(LlmkitError, match="--cache_top_k 5 keeps only the teacher's top tokens"):
        DecoderDistillation(teacher, DistillSettings(loss="reverse_kl"), top_k=5)


def test_top_k_on_the_fly_differs_from_the_full_vocabulary(text_tokens):
    teacher = tiny_decoder("tiny-llama", n_layers=2, seed=3)
    student = student_from_layers(teacher, [0])
    batch = window_batches(text_tokens[0], SEQ_LEN, seed=0)(0, 2, 0, 1)
    settings = DistillSettings(loss="kl", alpha=1.0)
    full = DecoderDistillation(teacher, settings)(student, batch).total.item()
    top = DecoderDistillation(teacher, settings, top_k=3)(student, batch).total.item()
    assert full != pytest.approx(top, rel=1e-3)


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_on_policy_generation_happens_only_with_lmbda(monkeypatch, tmp_path, text_tokens, lmbda, one_thread):
    calls = []
    real = objective_module.student_continuations

    def counting(model, prompts, new_tokens, seed):
        calls.append((prompts.clone(), new_tokens))
        return real(model, prompts, new_tokens, seed)

    monkeypatch.setattr(objective_module, "student_continuations", counting)
    teacher = tiny_decoder("tiny-llama", n_layers=2, seed=3)
    objective = DecoderDistillation(teacher, DistillSettings(loss="gkd", beta=0.5, lmbda=lmbda, prompt_tokens=10))
    train(student_from_layers(teacher, [0]), objective, window_batches(text_tokens[0], SEQ_LEN, seed=0),
          quiet(3, batch_size=2, eval_every=1), tmp_path, eval_batches=held_out_batches(text_tokens[1], SEQ_LEN, 2, 1))
    assert objective.on_policy_batches == len(calls) == (3 if lmbda else 0)  # never while validating
    if lmbda:
        prompts, new_tokens = calls[0]
        assert prompts.shape == (2, 10) and new_tokens == SEQ_LEN + 1 - 10


def test_an_on_policy_batch_keeps_the_prompt_and_the_label_count(text_tokens):
    teacher = tiny_decoder("tiny-llama", n_layers=2, seed=3)
    objective = DecoderDistillation(teacher, DistillSettings(loss="gkd", lmbda=1.0, prompt_tokens=20))
    batch = window_batches(text_tokens[0], SEQ_LEN, seed=0)(0, 2, 0, 1)
    student = student_from_layers(teacher, [0])
    rewritten = objective.on_policy(student, batch)
    assert torch.equal(rewritten["input_ids"][:, :20], batch["input_ids"][:, :20])
    assert torch.equal(rewritten["labels"][:, :-1], rewritten["input_ids"][:, 1:])
    assert rewritten["labels"].shape == batch["labels"].shape
    assert not torch.equal(rewritten["labels"][:, 19:], batch["labels"][:, 19:])  # the student wrote the rest


def test_a_distilled_student_beats_the_same_student_trained_without_its_teacher(teacher, text_tokens, tmp_path,
                                                                                 one_thread):
    """Hinton's setting: a small transfer set (2,000 tokens, 100 steps, so the student sees each window many
    times). Cross-entropy alone memorises it; the teacher's soft targets carry how it generalises. Both students
    start from the same random init of one preset and see the same windows in the same order."""
    training, held_out = text_tokens
    small = TokensInMemory(training.ids[:2000], "train")
    scratch = student_from("tiny-llama", teacher, seed=7)
    train(scratch, causal_lm_loss, window_batches(small, SEQ_LEN, seed=1), quiet(100), tmp_path / "scratch")
    distilled = student_from("tiny-llama", teacher, seed=7)
    objective = DecoderDistillation(teacher, DistillSettings(loss="kl", temperature=1.0, alpha=1.0))
    train(distilled, objective, window_batches(small, SEQ_LEN, seed=1), quiet(100), tmp_path / "distilled")
    teacher_loss, scratch_loss, distilled_loss = (held_out_loss(model, held_out) for model in (teacher, scratch,
                                                                                               distilled))
    # a trial run of this setup gave about: teacher 2.3, scratch 2.9, distilled 2.5 nats per byte
    assert teacher_loss < distilled_loss < scratch_loss - 0.15


def test_sentence_distillation_pulls_student_embeddings_to_the_teachers(tmp_path, one_thread):
    torch.manual_seed(0)
    teacher = Encoder(Config.from_name("tiny-bert", n_layers=4)).eval()
    torch.manual_seed(1)
    student = Encoder(Config.from_name("tiny-bert", n_layers=2))  # random: far from the teacher's embeddings
    sentence = SentenceSettings(pooling="mean", normalize=True)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(5, 256, (int(n),), generator=generator).tolist() for n in torch.randint(4, 20, (64,))]
    batches = sentence_batches(rows, 0, seed=0)
    objective = SentenceDistillation(teacher, sentence, "cosine")

    def distance() -> float:  # mean 1 - cos over all rows, teacher on the fly
        batch = batches(0, 64, 0, 1)
        with torch.no_grad():
            return objective(student.eval(), batch).total.item() / 64

    before = distance()
    batch = batches(0, 4, 0, 1)
    with torch.no_grad():  # precomputed teacher embeddings give the same loss as the teacher on the fly
        target = pool(teacher(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"], sentence)
    assert objective(student, {**batch, "teacher_embeddings": target}).total.item() == pytest.approx(
        objective(student, batch).total.item(), rel=1e-6)
    train(student.train(), SentenceDistillation(teacher, sentence, "cosine", hidden_weight=1.0, hidden_loss="mse"), batches,
          quiet(30, batch_size=16), tmp_path)
    after = distance()
    assert after < before / 2, (before, after)


# --------------------------------------------------------------------------- the verb's errors


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli") / "teacher"
    save_model(tiny_decoder("tiny-llama", n_layers=2), directory, tokenizer=byte_tokenizer())
    return directory


def test_cli_refuses_a_student_with_another_tokenizer(capsys, teacher_dir, tmp_path):
    other = tmp_path / "other"
    save_model(tiny_decoder("tiny-llama", vocab_size=257), other, tokenizer=byte_tokenizer(specials=["<x>"]))
    code, err = cli_status(capsys, "distill", "--teacher", str(teacher_dir), "--student", str(other))
    assert code == 2 and err.count("\n") == 1
    assert f"--student {other} uses another tokenizer (257 tokens) than --teacher {teacher_dir} (256 tokens)" in err


def test_cli_refuses_a_student_of_another_vocabulary_size(capsys, teacher_dir, tmp_path):
    other = tmp_path / "other"
    save_model(tiny_decoder("tiny-llama", vocab_size=300), other)  # no tokenizer saved: the sizes are compared
    code, err = cli_status(capsys, "distill", "--teacher", str(teacher_dir), "--student", str(other))
    assert code == 2 and err.count("\n") == 1
    assert "the student's vocabulary has 300 ids but the teacher's 256" in err


@pytest.mark.parametrize(("flags", "message"), [
    (["--loss", "fancy"], "--loss"),
    (["--loss", "kl", "--lmbda", "0.5"], "--lmbda 0.5: on-policy samples belong to --loss gkd"),
    (["--temperature", "0"], "--temperature 0.0 must be positive"),
    (["--student", "tiny-llama", "--student_layers", "0,1"], "both name the student"),
    (["--student_layers", "zero"], "--student_layers zero: pass every_other, block_influence or teacher layer numbers"),
])
def test_cli_errors_are_one_line(capsys, teacher_dir, tmp_path, flags, message):
    code, err = cli_status(capsys, "distill", "--teacher", str(teacher_dir), "--output", str(tmp_path / "run"), *flags)
    assert code == 2 and message in err and "Traceback" not in err


def test_a_student_equal_to_its_teacher_has_zero_divergence_and_hidden_loss(text_tokens):
    teacher = tiny_decoder("tiny-llama", n_layers=2, seed=3)
    clone = student_from_layers(teacher, [0, 1]).eval()
    batch = window_batches(text_tokens[0], SEQ_LEN, seed=0)(0, 2, 0, 1)
    settings = DistillSettings(loss="kl", temperature=2.0, alpha=0.5, hidden_weight=1.0, hidden_loss="mse")
    terms = DecoderDistillation(teacher, settings)(clone, batch)
    assert terms.metrics["divergence"].item() == pytest.approx(0, abs=1e-4)
    assert terms.metrics["hidden"].item() == pytest.approx(0, abs=1e-6)
    cross_entropy = causal_lm_loss(teacher, batch).total.item()
    assert terms.total.item() == pytest.approx(0.5 * cross_entropy, rel=1e-4)


# ---- instruction data (--template) -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instruction_teacher(tmp_path_factory):
    """A tiny decoder whose byte tokenizer has an EOS (instruction examples end with it), and 24 Alpaca rows."""
    import json

    root = tmp_path_factory.mktemp("instruct")
    tokenizer = byte_tokenizer(specials=["<eos>"], eos_id=256, pad_id=256)
    save_model(tiny_decoder("tiny-llama", n_layers=2, vocab_size=257), root / "teacher", tokenizer=tokenizer)
    rows = [{"instruction": "Repeat the word twice.", "input": word, "output": f"{word} {word}"}
            for word in ("king", "queen", "lord", "lady", "sword", "crown") * 4]
    (root / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root, tokenizer


def test_instruction_distillation_scores_the_response_tokens_only(instruction_teacher):
    from llmkit.commands.distill import TextSource, instruction_batches
    from llmkit.distill.losses import forward_kl
    from llmkit.train.objectives import IGNORE_INDEX

    root, tokenizer = instruction_teacher
    settings = quiet(1, batch_size=4, eval_batches=1)
    source = TextSource([str(root / "data.jsonl")], "alpaca", FieldMap())
    batches, _, tokens = instruction_batches(source, tokenizer, 96, None, 0.25, settings)
    batch = batches(0, 4, 0, 1)
    scored = batch["labels"] != IGNORE_INDEX  # (B, T): the responses ("word word" + EOS) only
    # 18 training rows (the last 6 are held out): three of each word, each response "word word" in bytes + EOS
    assert tokens == 3 * sum(len(f"{w} {w}") + 1 for w in ("king", "queen", "lord", "lady", "sword", "crown"))
    assert int(scored.sum()) < int(batch["attention_mask"].sum()) / 3  # the prompt is most of each example
    teacher = tiny_decoder("tiny-llama", n_layers=2, vocab_size=257, seed=1).eval()
    student = tiny_decoder("tiny-llama", n_layers=2, vocab_size=257, seed=2).eval()
    terms = DecoderDistillation(teacher, DistillSettings(loss="kl", temperature=2.0, alpha=1.0))(student, batch)
    with torch.no_grad():
        mask = batch["attention_mask"]
        expected = forward_kl(student(batch["input_ids"], attention_mask=mask)[scored],
                              teacher(batch["input_ids"], attention_mask=mask)[scored], temperature=2.0)
    assert int(terms.tokens) == int(scored.sum())
    assert terms.metrics["divergence"].item() == pytest.approx(expected.sum().item(), rel=1e-5)


def test_cli_distils_on_instruction_data_with_a_template(capsys, instruction_teacher, tmp_path, one_thread):
    from llmkit.commands.distill import distill

    root, _ = instruction_teacher
    summary = distill(teacher=str(root / "teacher"), data=[str(root / "data.jsonl")], template="alpaca", seq_len=96,
                      held_out_fraction=0.25, train=quiet(4, batch_size=4, eval_batches=2),
                      output=str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "training tokens (responses)" in out and summary["steps"] == 4
    assert summary["student_perplexity"] < summary["student_perplexity_before"]  # lr 3e-3 on 4 steps moves it
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()


def test_cli_refuses_on_policy_batches_of_instruction_data(capsys, instruction_teacher, tmp_path):
    root, _ = instruction_teacher
    code, err = cli_status(capsys, "distill", "--teacher", str(root / "teacher"), "--data", str(root / "data.jsonl"),
                           "--template", "alpaca", "--loss", "gkd", "--lmbda", "0.5", "--train.max_steps", "2",
                           "--train.batch_size", "4", "--train.warmup_steps", "0", "--seq_len", "96",
                           "--output", str(tmp_path / "run"))
    assert code == 2 and "--lmbda 0" in err and err.count("\n") == 1


def identity_block_decoder(n_layers: int = 4, identity: int = 2) -> torch.nn.Module:
    """A tiny decoder whose block `identity` has zeroed output projections: it returns its input unchanged."""
    model = tiny_decoder("tiny-llama", n_layers=n_layers).eval()
    with torch.no_grad():
        model.blocks[identity].attn.o_proj.weight.zero_()
        model.blocks[identity].mlp.down_proj.weight.zero_()
    return model


def test_block_influence_student_drops_the_lowest_scored_blocks_identity_first():
    from llmkit.distill.student import block_influence_layer_indices
    from llmkit.quant.prune_structured import block_influence

    teacher = identity_block_decoder(n_layers=5, identity=2)
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    scores = block_influence(teacher, calibration)
    assert block_influence_layer_indices(teacher, calibration, 4) == [0, 1, 3, 4]  # the identity block goes first
    for keep in (1, 2, 3):  # whatever the size, the kept blocks are those of the highest scores, in model order
        kept = block_influence_layer_indices(teacher, calibration, keep)
        dropped = [i for i in range(5) if i not in kept]
        assert kept == sorted(kept) and len(kept) == keep
        assert scores[kept].min() >= scores[dropped].max()
    with pytest.raises(LlmkitError, match="--student_n_layers 5: a student made by block influence keeps 1 to 4"):
        block_influence_layer_indices(teacher, calibration, 5)
    encoder = Encoder(Config.from_name("tiny-bert", n_layers=4))
    with pytest.raises(LlmkitError, match="scores a decoder's blocks"):
        block_influence_layer_indices(encoder, calibration, 2)


def test_cli_builds_a_block_influence_student_from_the_training_text(capsys, tmp_path, one_thread):
    from llmkit.checkpoints import load_model
    from llmkit.commands.distill import distill

    teacher = identity_block_decoder(n_layers=4, identity=1)
    save_model(teacher, tmp_path / "teacher", tokenizer=byte_tokenizer())
    (tmp_path / "text.txt").write_text(shakespeare_text()[:20_000])
    distill(teacher=str(tmp_path / "teacher"), student_layers="block_influence", student_n_layers=3,
            data=[str(tmp_path / "text.txt")], seq_len=32, held_out_fraction=0.1,
            train=quiet(1, batch_size=2, lr=1e-12, warmup_steps=0), output=str(tmp_path / "run"))
    assert "block influence keeps teacher layers 0,2,3" in capsys.readouterr().out
    student = load_model(tmp_path / "run" / "student")
    assert student.config.n_layers == 3
    for new, old in enumerate([0, 2, 3]):  # lr 1e-12: the saved weights are still the teacher's blocks
        torch.testing.assert_close(student.blocks[new].mlp.down_proj.weight, teacher.blocks[old].mlp.down_proj.weight,
                                   rtol=0, atol=1e-9)


@pytest.mark.parametrize(("flags", "message"), [
    (["--student_n_layers", "1"], "--student_n_layers 1 sizes a --student_layers block_influence student"),
    (["--student_layers", "block_influence", "--student_n_layers", "2", "--max_tokens", "4000"],
     "--student_n_layers 2: a student made by"),
])
def test_cli_refuses_bad_block_influence_settings(capsys, teacher_dir, tmp_path, flags, message):
    code, err = cli_status(capsys, "distill", "--teacher", str(teacher_dir), "--output", str(tmp_path / "run"), *flags)
    assert code == 2 and message in err and err.count("\n") == 1
