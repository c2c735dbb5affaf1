"""The Morse training aid (minaf3/letter_head.py): per-token letter targets that follow the clip's letters
in time, a head whose loss covers the morse rows only, and a training run that keeps it out of the saved
model."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from minaf3.letter_head import LETTERS, LetterHead, letter_targets
from minaf3.loss import IGNORE_INDEX
from minaf3.processor import strip_transcription_prefix
from minaf3.tasks import example_at, letter_spans
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


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_targets_name_each_letter_once_in_order_over_its_tokens(seed):
    clip = example_at("morse", seed, 0)
    n = tokens_of(clip)
    targets = letter_targets([clip], [n])
    assert targets.shape == (n,) and targets.dtype == torch.long
    lettered = [(v, a, b) for v, a, b in runs(targets.tolist()) if v]
    truth = strip_transcription_prefix(clip.answer)
    assert "".join(LETTERS[v - 1] for v, _, _ in lettered) == truth  # one run per letter, in order
    seconds = n * 0.04  # 40 ms a token: 30 s windows of 750 tokens
    assert seconds <= len(clip.waveform) / SAMPLING_RATE + 0.04
    for (_, a, b), (_, start, end) in zip(lettered, letter_spans(clip), strict=True):
        assert abs(a * 0.04 - start) <= 0.04 and abs(b * 0.04 - end) <= 0.04  # the run covers the letter


def test_other_tasks_tokens_are_ignored_and_clips_stay_in_order():
    clips = [example_at("count", 0, 0), example_at("morse", 0, 1), example_at("pitch", 0, 2)]
    n = [tokens_of(c) for c in clips]
    targets = letter_targets(clips, n)
    assert targets.shape == (sum(n),)
    assert (targets[: n[0]] == IGNORE_INDEX).all() and (targets[n[0] + n[1] :] == IGNORE_INDEX).all()
    assert torch.equal(targets[n[0] : n[0] + n[1]], letter_targets(clips[1:2], n[1:2]))


def test_head_loss_is_cross_entropy_over_the_morse_rows_only():
    head = LetterHead(8, seed=0)
    audio = torch.randn(10, 8, requires_grad=True)
    targets = torch.tensor([IGNORE_INDEX] * 4 + [0, 3, 3, 0, 26, 0])
    expected = F.cross_entropy(head.proj(audio[4:]), targets[4:])
    assert torch.allclose(head(audio, targets), expected)
    none = head(audio, torch.full((10,), IGNORE_INDEX))
    none.backward()
    assert none.item() == 0.0 and all(p.grad is not None and not p.grad.any() for p in head.parameters())
    assert not audio.grad.any()


def test_head_starts_as_the_model_does_and_from_its_seed():
    a, b, c = LetterHead(64, seed=0), LetterHead(64, seed=0), LetterHead(64, seed=1)
    assert torch.equal(a.proj.weight, b.proj.weight) and not torch.equal(a.proj.weight, c.proj.weight)
    assert a.proj.weight.shape == (1 + 26, 64) and not a.proj.bias.any()
    assert a.proj.weight.std().item() == pytest.approx(0.02, rel=0.1)


SMALL = dict(
    audio_layers=1, audio_hidden=16, audio_heads=2, audio_intermediate=32, text_layers=1, text_hidden=32,
    text_heads=2, text_kv_heads=1, text_intermediate=64, batch_size=4, pool_batches=2, warmup_steps=2,
    listen_steps=0, threads=1, save_every=5, steps=5, tasks=("pitch", "morse"), task_weights=(1.0, 1.0),
)  # fmt: skip


def test_training_uses_the_head_and_saves_it_apart_from_the_model(tmp_path):
    aided = train(TrainConfig(**SMALL), tmp_path / "aided", progress=False)
    plain = train(TrainConfig(**SMALL, letter_loss=0.0), tmp_path / "plain", progress=False)
    assert aided.losses[0] == plain.losses[0]  # the logged loss is the model's own
    assert aided.losses[1:] != plain.losses[1:]  # the head's gradient changed the model
    state = torch.load(tmp_path / "aided" / STATE, weights_only=True)
    assert set(state["letter_head"]) == {"proj.weight", "proj.bias"}
    assert "letter_head" not in torch.load(tmp_path / "plain" / STATE, weights_only=True)
    with safe_open(tmp_path / "aided" / "model.safetensors", "pt") as saved:
        names = set(saved.keys())
    with safe_open(tmp_path / "plain" / "model.safetensors", "pt") as saved:
        assert names == set(saved.keys())  # the hub layout's names only
