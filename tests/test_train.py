"""The training loop (minaf3/train.py) on a model small enough for seconds: reproducible, resumable, learning,
and saving what minaf3 and transformers load. The shipped model's own run is never repeated here."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from minaf3.weights.layouts import HUB, checkpoint_names
from safetensors import safe_open

import minaf3
from minaf3.cli import main as cli_main
from minaf3.errors import ConfigError
from minaf3.model import AudioFlamingo3ForConditionalGeneration
from minaf3.tasks import FIRST_TRAIN_SEED, TASKS
from minaf3.train import (
    LOG,
    TrainConfig,
    evaluate,
    learning_rate,
    new_model,
    pool_batches,
    pool_examples,
    task_corpus,
    train,
    training_batch,
)

# One layer each side, a few clips a step, one thread (steps of ~20 ms).
SMALL = dict(
    audio_layers=1,
    audio_hidden=16,
    audio_heads=2,
    audio_intermediate=32,
    text_layers=1,
    text_hidden=32,
    text_heads=2,
    text_kv_heads=1,
    text_intermediate=64,
    batch_size=4,
    pool_batches=2,
    warmup_steps=5,
    listen_steps=0,  # no curriculum: every task from the first step
    lr=1e-2,  # a small model learns fast at a high rate: the loss falls within a few dozen steps
    min_lr=1e-3,
    threads=1,
    log_every=5,
    save_every=10,
)


def small(**changes) -> TrainConfig:
    return TrainConfig(**{**SMALL, **changes})


def tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small run of 30 steps, kept for the tests that only read its results."""
    folder = tmp_path_factory.mktemp("trained")
    return train(small(steps=30), folder, progress=False)


def test_same_seed_same_losses(tmp_path):
    config = small(steps=50)
    first = train(config, tmp_path / "a", progress=False).losses
    again = train(config, tmp_path / "b", progress=False).losses
    other = train(dataclasses.replace(config, seed=1, steps=5), tmp_path / "c", progress=False).losses
    assert len(first) == 50 and first == again
    assert other != first[:5]


def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path, trained):
    config = small(steps=30)
    killed = train(config, tmp_path, progress=False, until=25)  # checkpoint at 20; steps 20..24 are lost
    assert killed.step == 25
    resumed = train(config, tmp_path, progress=False)
    assert resumed.step == 30 and len(resumed.losses) == 10  # started again from step 20
    assert resumed.losses == trained.losses[20:]
    ours, uninterrupted = tensors(tmp_path), tensors(trained.folder)
    assert ours.keys() == uninterrupted.keys()
    assert all(torch.equal(ours[name], uninterrupted[name]) for name in ours)
    steps = [json.loads(line)["step"] for line in (tmp_path / LOG).read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 30]  # the lost steps' lines were dropped, then logged again
    assert train(config, tmp_path, progress=False).losses == []  # done: nothing left to run


def test_resuming_with_other_settings_is_refused(tmp_path):
    train(small(steps=10), tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"other settings \(lr=0.01\)"):
        train(small(steps=10, lr=0.02), tmp_path, progress=False)
    train(small(steps=10, log_every=2), tmp_path, progress=False)  # bookkeeping may change


def test_thirty_steps_cut_the_loss_by_40_percent(trained):
    """From ln(vocabulary) (uniform guesses) the answers' format is learned first: the mean loss of the last
    five steps is under 60% of that of the first five."""
    losses = trained.losses
    vocabulary = minaf3.AudioFlamingo3Processor.from_pretrained(trained.folder).tokenizer.get_vocab_size()
    assert abs(np.mean(losses[:1]) - math.log(vocabulary)) < 0.5
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


def test_learning_rate_warms_up_then_decays_to_min_lr():
    config = TrainConfig(steps=1000, warmup_steps=100, lr=1e-3, min_lr=1e-4)
    rates = [learning_rate(config, step) for step in range(config.steps)]
    assert rates[0] == pytest.approx(config.lr / config.warmup_steps)
    assert rates[99] == pytest.approx(config.lr) and max(rates) == pytest.approx(config.lr)
    assert all(a < b for a, b in zip(rates[:99], rates[1:100], strict=True))  # warmup rises
    assert all(a >= b for a, b in zip(rates[99:], rates[100:], strict=False))  # then never rises
    middle = 100 + (config.steps - 1 - 100) / 2
    assert learning_rate(config, int(middle)) == pytest.approx((config.lr + config.min_lr) / 2, rel=1e-2)
    assert rates[-1] == pytest.approx(config.min_lr)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(steps=0), "steps must be >= 1"),
        (dict(batch_size=2.5), "batch_size must be an integer"),
        (dict(lr=-1.0), "lr > 0"),
        (dict(min_lr=1.0), "min_lr <= lr"),
        (dict(tasks=("count", "smell")), "tasks and listen_tasks must name some of"),
        (dict(listen_tasks=("hum",)), "tasks and listen_tasks must name some of"),
        (dict(task_weights=(1.0,)), "one weight >= 0 per task"),
        (dict(text_hidden=30), "text_heads \\(2\\) times an even"),
        (dict(audio_heads=3), "not divisible"),
        (dict(text_kv_heads=3), "not a multiple"),
        (dict(bf16="yes"), "bf16 must be True or False"),
        (dict(letter_loss=-0.5), "letter_loss must be >= 0"),
        (dict(beep_loss=-1.0), "beep_loss must be >= 0"),
        (dict(weight_decay=-1.0), "weight_decay must be >= 0, got -1.0"),
        (dict(grad_clip=0.0), "grad_clip must be > 0"),
    ],
)
def test_bad_settings_raise_config_error(changes, message):
    with pytest.raises(ConfigError, match=message):
        small(**changes)


def test_batches_are_fresh_clips_sorted_by_length_with_answer_labels():
    config = small(steps=10, batch_size=8, pool_batches=4, tasks=("count", "morse"), task_weights=(0.0, 1.0))
    clips = pool_examples(config, 0)
    assert [c.task for c in clips] == ["morse"] * 32  # a weight of 0: never drawn
    assert [c.answer for c in clips] == [c.answer for c in pool_examples(config, 0)]  # (seed, pool) alone
    later = pool_examples(config, 1)  # the next pool: other clips
    assert not any(np.array_equal(a.waveform, b.waveform) for a, b in zip(clips, later, strict=True))
    batches = pool_batches(config, 0)
    lengths = [sorted(len(c.waveform) for c in batch) for batch in batches]
    spans = sorted((batch[0], batch[-1]) for batch in lengths)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # batches do not overlap
    _, processor = new_model(config)
    batch = training_batch(processor, batches[0])
    for row, clip in zip(batch["labels"], batches[0], strict=True):
        learned = processor.decode(row[row != -100], skip_special_tokens=False)
        assert learned == clip.answer + "<|im_end|>"
    assert (batch["attention_mask"][:, 0] == 1).all()  # right padding: every row starts at position 0


def test_the_first_steps_draw_only_the_listening_tasks():
    config = small(steps=100, batch_size=8, pool_batches=4, listen_steps=12, listen_tasks=("pitch", "kind"))
    early = {c.task for pool in range(3) for c in pool_examples(config, pool)}  # steps 0..11
    later = {c.task for pool in range(3, 10) for c in pool_examples(config, pool)}
    assert early == {"pitch", "kind"} and later == set(TASKS)
    with pytest.raises(ConfigError, match="listen_tasks"):
        small(tasks=("count",), task_weights=(1.0,), listen_steps=5, listen_tasks=("pitch",))


def test_training_clips_come_from_training_seeds():
    config = small(steps=10, seed=3)
    first = pool_examples(config, 0)[0]
    from minaf3.tasks import example_at

    again = example_at(first.task, FIRST_TRAIN_SEED + 3, 0)
    assert np.array_equal(first.waveform, again.waveform)


def test_tokenizer_spells_letters_and_digits_one_token_each():
    config = small(steps=1)
    _, processor = new_model(config)
    tokenizer = processor.tokenizer
    for text in ("SOS", "QZX", "ABC"):
        assert tokenizer.encode(text).tokens == list(text)
    assert tokenizer.encode("3 beeps").tokens[0] == "3"
    assert all(tokenizer.encode(text).ids for text in task_corpus())  # every task text tokenizes


def test_saved_model_has_hub_names_and_transformers_agrees(trained):
    """The folder holds the hub layout's names and transformers computes the same logits from it."""
    from transformers import AudioFlamingo3ForConditionalGeneration as Reference
    from transformers import AutoProcessor

    folder = trained.folder
    ours = AudioFlamingo3ForConditionalGeneration.from_pretrained(folder)
    expected = set(checkpoint_names(HUB, ours.state_dict()).values())
    assert set(tensors(folder)) == expected
    reference, info = Reference.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    conversation = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Count the beeps."}, {"type": "audio", "audio": x}],
        }
        for x in [np.sin(np.arange(16000, dtype=np.float32) * 0.3)]
    ]
    ref_inputs = AutoProcessor.from_pretrained(folder).apply_chat_template(
        conversation, tokenize=True, add_generation_prompt=True, return_dict=True
    )
    inputs = minaf3.AutoProcessor.from_pretrained(folder).apply_chat_template(conversation)
    assert torch.equal(inputs["input_ids"], ref_inputs["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(
            ours(**inputs).logits, reference.eval()(**ref_inputs).logits, atol=1e-4, rtol=1e-4
        )


def test_evaluation_during_training_leaves_the_model_intact():
    """generate inside the loop: the optimizer's parameters stay the model's, with their values, and the
    next step still updates them."""
    config = small(steps=1, tasks=("pitch", "morse"), task_weights=(1.0, 1.0))
    model, processor = new_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = training_batch(processor, pool_batches(config, 0)[0])
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    scores = evaluate(model, processor, config.tasks, clips=2)
    assert set(scores) == {"pitch", "morse"} and "letters" in scores["morse"]
    live = list(model.parameters())
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in live]
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert all(p.requires_grad and not p.is_inference() for p in live)
    model(**batch).loss.backward()
    optimizer.step()
    assert not torch.equal(before["lm_head.weight"], model.lm_head.weight)


def test_cli_train_and_its_errors(tmp_path, capsys):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    assert cli_main(["train", "--out", str(tmp_path), "--steps", "3", "--no-progress", *args]) == 0
    out = capsys.readouterr().out
    assert "3 steps" in out and str(tmp_path) in out
    assert minaf3.load(tmp_path).model.config.decoder.num_layers == 1
    assert cli_main(["train", "--out", str(tmp_path / "x"), "--steps", "0", *args]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    assert (
        cli_main(["train", "--out", str(tmp_path / "y"), "--tasks", "count", "--task-weights", "1", "2"]) == 2
    )
    assert "one weight >= 0 per task" in capsys.readouterr().err


def test_two_processes_under_torchrun_share_each_batch_and_agree(tmp_path):
    """torchrun with 2 processes: one summary line, one log, and the same weights from the same command."""
    import os
    import subprocess
    import sys

    options = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items() if k != "threads"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def run(out):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        command += ["-m", "minaf3", "train", "--out", str(out), "--steps", "6", "--no-progress", *options]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    first, again = run(tmp_path / "a"), run(tmp_path / "b")
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert first.stdout.count("minaf3 train: 6 steps") == 1  # process 0 speaks for both
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert all(torch.equal(a[name], b[name]) for name in a)
    state = torch.load(tmp_path / "a" / "train" / "state.pt", weights_only=True)
    assert state["config"]["processes"] == 2 and state["step"] == 6
    with pytest.raises(ConfigError, match="processes=2"):  # one process cannot resume a two-process run
        train(small(steps=8), tmp_path / "a", progress=False)
