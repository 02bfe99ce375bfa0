"""Distillation on real weights (slow): SmolLM2-135M-Instruct's every-other-layer student learns from the
teacher on real text, and `llmkit distill` pulls a 3-layer all-MiniLM-L6-v2 student towards the teacher's
sentence embeddings."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from llmkit.checkpoints import default_model_path, load_tokenizer
from llmkit.checkpoints.hf_bert import default_encoder_path
from llmkit.commands.common import load_decoder
from llmkit.data.shared import shared_data_file
from llmkit.distill.data import TokensInMemory, tokenize_documents, window_batches
from llmkit.distill.objective import DecoderDistillation
from llmkit.distill.settings import DistillSettings
from llmkit.distill.student import every_other_layer_indices, student_from_layers
from llmkit.train.loop import train
from llmkit.train.settings import TrainSettings
from tests.helpers import run_cli, write_jsonl

pytestmark = pytest.mark.slow
WIKI = "wiki_vital/summaries_en.jsonl.gz"


def wiki_articles(count: int) -> list[dict]:
    with gzip.open(shared_data_file(WIKI), "rt", encoding="utf-8") as file:
        return [json.loads(next(file)) for _ in range(count)]


@pytest.fixture(scope="module")
def smollm2():
    path = default_model_path()
    return load_tokenizer(path), load_decoder(path, weights="float")


def test_smollm2_every_other_layer_student_learns_from_the_teacher(smollm2, tmp_path):
    tokenizer, teacher = smollm2
    layers = every_other_layer_indices(teacher.config.n_layers)
    student = student_from_layers(teacher, layers)
    assert student.config.n_layers == 15 and layers[:3] == [0, 2, 4]
    assert torch.equal(student.blocks[7].mlp.down_proj.weight, teacher.blocks[14].mlp.down_proj.weight)
    ids = tokenize_documents(tokenizer, [article["text"] for article in wiki_articles(10)], max_tokens=2 * 33)
    batches = window_batches(TokensInMemory(ids, "train"), 32, seed=0)  # one batch of 2 x 32 tokens, repeated
    objective = DecoderDistillation(teacher, DistillSettings(loss="kl", temperature=1.0, alpha=1.0))

    def kl_to_teacher() -> float:
        with torch.no_grad():
            terms = objective(student.eval(), batches(0, 2, 0, 1))
        return terms.total.item() / terms.tokens.item()

    before = kl_to_teacher()
    train(student.train(), objective, batches, TrainSettings(max_steps=4, batch_size=2, lr=3e-4, warmup_steps=0,
                                                             eval_every=0, checkpoint_every=100), tmp_path)
    assert kl_to_teacher() < 0.7 * before


def test_cli_distils_minilm_into_three_layers(capsys, tmp_path):
    data = write_jsonl(tmp_path / "wiki.jsonl", [{"text": a["text"]} for a in wiki_articles(72)])
    code, out, err = run_cli(capsys, "distill", "--teacher", str(default_encoder_path()), "--data", str(data),
                             "--seq_len", "64", "--held_out_fraction", "0.12", "--train.max_steps", "8",
                             "--train.batch_size", "16", "--train.lr", "1e-4", "--train.warmup_steps", "0",
                             "--output", str(tmp_path / "run"))
    assert code == 0, err
    assert "student 3 layers" in out
    before, after = (float(word) for word in out.split("held-out cosine to the teacher ")[-1].split(";")[0].split(" -> "))
    assert after > before  # the student's embeddings of unseen texts move towards the teacher's
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file() and (tmp_path / "run" / "loss.png").is_file()


def test_smollm2_block_influence_student_beats_every_other_and_evenly_spaced_ones_at_init(smollm2):
    from llmkit.distill.data import held_out_batches, held_out_perplexity
    from llmkit.distill.student import block_influence_layer_indices

    tokenizer, teacher = smollm2
    texts = [article["text"] for article in wiki_articles(60)]
    calibration_ids = tokenize_documents(tokenizer, texts[:30], max_tokens=8 * 65)
    calibration = window_batches(TokensInMemory(calibration_ids, "train"), 64, seed=0)(0, 8, 0, 1)["input_ids"]
    held_out = held_out_batches(TokensInMemory(tokenize_documents(tokenizer, texts[30:], max_tokens=4 * 64 + 1),
                                               "held-out"), 64, 4)  # other articles than the calibration ones
    kept = block_influence_layer_indices(teacher, calibration, 20)
    evenly_spaced = [round(i * 29 / 19) for i in range(20)]  # 0, 2, 3, 5, ..., 29: the same size chosen by position
    by_influence = held_out_perplexity(student_from_layers(teacher, kept), held_out)
    by_position = held_out_perplexity(student_from_layers(teacher, evenly_spaced), held_out)
    assert len(kept) == 20 and 0 in kept  # block 0 (token embeddings -> residual stream) turns it most: kept
    assert by_influence < 0.05 * by_position  # measured 2026-12-06 on this text: 118 vs 26,731
