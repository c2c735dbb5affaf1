"""Training aids for the tasks that ask what happens when: linear heads that name, at every audio token of a
count or morse clip, the beep or the letter sounding there. They train beside the model and are dropped when
the model is saved.

An answer teaches through the decoder alone: one cross-entropy for "4 beeps", one per letter of "SOS", and
only after the decoder has found the bursts in the clip and the encoder has made them into something that
can be numbered or read. Trained that way alone, the tiny model estimates a count from the clip's length and
density rather than counting, and it learns Morse only when Morse is most of what it hears. The generator
knows where every beep and letter is (tasks.labelled_spans), so each audio token of such a clip gets a
target of its own: for count, the number of the beep sounding at the token's middle (1..6); for morse, the
letter being keyed (A..Z); "none" in the gaps and the silence around. A linear head per task over the audio
embeddings (the projector's output, the rows the decoder reads) is scored on those targets, and its loss,
times the task's weight (TrainConfig.beep_loss, letter_loss), is added to the model's: the encoder and
projector learn to number the beeps and name the letters where they sound, and the decoder has only to read
off the last number or the letters in order. Like the auxiliary CTC losses of hybrid speech recognisers, it
shapes training and is not part of the model.

    targets = span_targets(task, clips, tokens)   (N,) one per audio row of the batch: 0 none, k + 1 for
                                                   LABELS[task][k], IGNORE_INDEX for the other tasks' rows
    loss = head(audio_rows, targets)               mean cross-entropy over the task's rows (0 if none)
    loss_with_heads(model, batch, aids)            what a training step minimises, and the model's own loss
"""

import torch
import torch.nn.functional as F
from torch import nn

from minaf3.errors import ConfigError
from minaf3.loss import IGNORE_INDEX
from minaf3.tasks import BEEPS, LABELLED, MORSE_CODE, Example, labelled_spans
from minaf3.windows import TOKEN_SECONDS

# task -> the labels its spans carry; target k + 1 is LABELS[task][k], target 0 is "nothing sounds here"
LABELS = {
    "count": tuple(str(n) for n in range(1, BEEPS[1] + 1)),
    "morse": tuple(MORSE_CODE),
}
assert set(LABELS) == set(LABELLED)


def labels_of(task: str) -> tuple[str, ...]:
    """LABELS[task]; ConfigError for a task without spans."""
    if task not in LABELS:
        raise ConfigError(f"span heads are for {' and '.join(LABELS)} clips, not {task!r}")
    return LABELS[task]


def span_targets(task: str, clips: list[Example], tokens: list[int]) -> torch.Tensor:
    """clips and the number of audio tokens of each -> (sum(tokens),) int64 targets, clip after clip: for a
    clip of `task`, per token, 1 + the index in LABELS[task] of the span that holds the token's middle
    (token t covers seconds [t, t + 1) * TOKEN_SECONDS), else 0; IGNORE_INDEX for other tasks' tokens."""
    labels = labels_of(task)
    parts = []
    for clip, n in zip(clips, tokens, strict=True):
        if clip.task != task:
            parts.append(torch.full((n,), IGNORE_INDEX, dtype=torch.long))
            continue
        middles = (torch.arange(n, dtype=torch.float64) + 0.5) * TOKEN_SECONDS
        target = torch.zeros(n, dtype=torch.long)
        for label, start, end in labelled_spans(clip):
            target[(middles >= start) & (middles < end)] = 1 + labels.index(label)
        parts.append(target)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


class SpanHead(nn.Module):
    """Audio rows (N, D) -> logits (N, 1 + len(LABELS[task])) over "none" and the task's labels; called with
    targets, the loss."""

    def __init__(self, task: str, hidden: int, seed: int = 0):
        super().__init__()
        self.task = task
        self.proj = nn.Linear(hidden, 1 + len(labels_of(task)))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # the model's own initialisation (model.init_weights): normal(0.02), zero bias
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=generator) * 0.02)
            self.proj.bias.zero_()

    def forward(self, audio: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """audio (N, D), targets (N,) from span_targets -> mean cross-entropy (float32 scalar) over the rows
        whose target is not IGNORE_INDEX; a zero that still reaches the head's weights if none is."""
        scored = targets != IGNORE_INDEX
        logits = self.proj(audio[scored]).float()  # (n, 1 + labels)
        if not len(logits):
            return logits.sum()  # 0, and every parameter of the head gets a (zero) gradient
        return F.cross_entropy(logits, targets[scored].to(logits.device))


def loss_with_heads(
    model, batch: dict, aids: list[tuple[SpanHead, torch.Tensor, float]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(model's loss + the sum of weight x head's loss on the audio rows over the (head, targets, weight) of
    `aids`, the model's loss) for a batch of the processor's outputs with labels: model(**batch).loss,
    computed from the same audio embeddings the heads read (the rows of `<sound>` tokens after
    embed_inputs, clip after clip, in time order)."""
    embeds = model.embed_inputs(batch["input_ids"], batch["input_features"], batch["input_features_mask"])
    loss = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    audio = embeds[batch["input_ids"] == model.config.audio_token_id]  # (N, D)
    return loss + sum(weight * head(audio, targets) for head, targets, weight in aids), loss
