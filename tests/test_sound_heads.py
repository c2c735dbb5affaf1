"""The training aids (minaf3/sound_heads.py): per-token targets that follow a count clip's beeps and a morse
clip's letters in time, heads whose loss covers their task's rows only, and a training run that keeps them
out of the saved model."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from minaf3.errors import ConfigError
from minaf3.loss import IGNORE_INDEX
from minaf3.processor import strip_transcription_prefix
from minaf3.sound_heads import LABELS, SpanHead, span_targets
from minaf3.tasks import example_at, labelled_spans
from minaf3.train import STATE, TrainConfig, train
from minaf3.windows import SAMPLING_RATE, audio_token_lengths, mel_frames


def tokens_of(clip) -> int:
    """The audio tokens the processor gives this clip: its frame math, from the sample count."""
    return int(audio_token_lengths(torch.tensor([mel_frames(len(clip.waveform))]))[0])


def runs(values: list[int]) -> list[tuple[int, int, int]]:
    """(value, first index, last index + 1) of each run of equal values."""
    out = []
    for i, v in enumerate(values):
        if out and out[-1][0] == v:
            out[-1] = (v, out[-1][1], i + 1)
        else:
            out.append((v, i, i + 1))
    return out


def truth(clip) -> list[str]:
    """What the clip's answer names, one label per span: the letters, or the beeps' numbers 1..count."""
    if clip.task == "morse":
        return list(strip_transcription_prefix(clip.answer))
    return [str(i + 1) for i in range(int(clip.answer.split()[0]))]


@settings(max_examples=20, deadline=None)
@given(task=st.sampled_from(["count", "morse"]), seed=st.integers(0, 2**32 - 1))
def test_targets_name_each_beep_or_letter_once_in_order_over_its_tokens(task, seed):
    clip = example_at(task, seed, 0)
    n = tokens_of(clip)
    targets = span_targets(task, [clip], [n])
    assert targets.shape == (n,) and targets.dtype == torch.long
    labelled = [(v, a, b) for v, a, b in runs(targets.tolist()) if v]
    assert [LABELS[task][v - 1] for v, _, _ in labelled] == truth(clip)  # one run per span, in order
    seconds = n * 0.04  # 40 ms a token: 30 s windows of 750 tokens
    assert seconds <= len(clip.waveform) / SAMPLING_RATE + 0.04
    for (_, a, b), (_, start, end) in zip(labelled, labelled_spans(clip), strict=True):
        assert abs(a * 0.04 - start) <= 0.04 and abs(b * 0.04 - end) <= 0.04  # the run covers the span


@pytest.mark.parametrize("task", ["count", "morse"])
def test_other_tasks_tokens_are_ignored_and_clips_stay_in_order(task):
    other = "morse" if task == "count" else "count"
    clips = [example_at(other, 0, 0), example_at(task, 0, 1), example_at("pitch", 0, 2)]
    n = [tokens_of(c) for c in clips]
    targets = span_targets(task, clips, n)
    assert targets.shape == (sum(n),)
    assert (targets[: n[0]] == IGNORE_INDEX).all() and (targets[n[0] + n[1] :] == IGNORE_INDEX).all()
    assert torch.equal(targets[n[0] : n[0] + n[1]], span_targets(task, clips[1:2], n[1:2]))


def test_targets_are_for_the_labelled_tasks_only():
    with pytest.raises(ConfigError, match="span heads are for count and morse clips, not 'pitch'"):
        span_targets("pitch", [example_at("pitch", 0, 0)], [10])
    with pytest.raises(ConfigError, match="not 'hum'"):
        SpanHead("hum", 8)
    with pytest.raises(ConfigError, match="count or morse example"):
        labelled_spans(example_at("pitch", 0, 0))


def test_head_loss_is_cross_entropy_over_its_tasks_rows_only():
    head = SpanHead("morse", 8, seed=0)
    audio = torch.randn(10, 8, requires_grad=True)
    targets = torch.tensor([IGNORE_INDEX] * 4 + [0, 3, 3, 0, 26, 0])
    expected = F.cross_entropy(head.proj(audio[4:]), targets[4:])
    assert torch.allclose(head(audio, targets), expected)
    none = head(audio, torch.full((10,), IGNORE_INDEX))
    none.backward()
    assert none.item() == 0.0 and all(p.grad is not None and not p.grad.any() for p in head.parameters())
    assert not audio.grad.any()


def test_heads_start_as_the_model_does_and_from_their_seed():
    a, b, c = SpanHead("morse", 64, seed=0), SpanHead("morse", 64, seed=0), SpanHead("morse", 64, seed=1)
    assert torch.equal(a.proj.weight, b.proj.weight) and not torch.equal(a.proj.weight, c.proj.weight)
    assert a.proj.weight.shape == (1 + 26, 64) and not a.proj.bias.any()
    assert a.proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert SpanHead("count", 64).proj.weight.shape == (1 + 6, 64)


SMALL = dict(
    audio_layers=1, audio_hidden=16, audio_heads=2, audio_intermediate=32, text_layers=1, text_hidden=32,
    text_heads=2, text_kv_heads=1, text_intermediate=64, batch_size=4, pool_batches=2, warmup_steps=2,
    listen_steps=0, threads=1, save_every=5, steps=5, tasks=("count", "morse"), task_weights=(1.0, 1.0),
    beep_loss=1.0, letter_loss=1.0,
)  # fmt: skip


def test_training_uses_the_heads_and_saves_them_apart_from_the_model(tmp_path):
    aided = train(TrainConfig(**SMALL), tmp_path / "aided", progress=False)
    beeps = train(TrainConfig(**{**SMALL, "letter_loss": 0.0}), tmp_path / "beeps", progress=False)
    plain = TrainConfig(**{**SMALL, "beep_loss": 0.0, "letter_loss": 0.0})
    plain = train(plain, tmp_path / "plain", progress=False)
    assert aided.losses[0] == beeps.losses[0] == plain.losses[0]  # the logged loss is the model's own
    assert aided.losses[1:] != beeps.losses[1:] != plain.losses[1:]  # each head's gradient changed the model
    state = torch.load(tmp_path / "aided" / STATE, weights_only=True)
    assert {task: set(sd) for task, sd in state["heads"].items()} == {
        "count": {"proj.weight", "proj.bias"},
        "morse": {"proj.weight", "proj.bias"},
    }
    assert set(torch.load(tmp_path / "beeps" / STATE, weights_only=True)["heads"]) == {"count"}
    assert "heads" not in torch.load(tmp_path / "plain" / STATE, weights_only=True)
    with safe_open(tmp_path / "aided" / "model.safetensors", "pt") as saved:
        names = set(saved.keys())
    with safe_open(tmp_path / "plain" / "model.safetensors", "pt") as saved:
        assert names == set(saved.keys())  # the hub layout's names only


def test_a_resumed_run_reloads_its_heads(tmp_path):
    whole = train(TrainConfig(**{**SMALL, "steps": 8, "save_every": 4}), tmp_path / "whole", progress=False)
    config = TrainConfig(**{**SMALL, "steps": 8, "save_every": 4})
    train(config, tmp_path / "cut", progress=False, until=4)
    resumed = train(config, tmp_path / "cut", progress=False)
    assert resumed.losses == whole.losses[4:]
    ends = [torch.load(tmp_path / run / STATE, weights_only=True)["heads"] for run in ("whole", "cut")]
    assert all(torch.equal(ends[0][t][k], ends[1][t][k]) for t in ends[0] for k in ends[0][t])
