"""A training aid for reading Morse: a linear head that names, at every audio token of a morse clip, the
letter being keyed there. It trains beside the model and is dropped when the model is saved.

The answer to a morse clip ('The spoken content of the audio is "SOS".') teaches the letters only through
the decoder: one cross-entropy per letter, after the decoder has found where in the clip that letter is and
the encoder has made its dots and dashes into something a letter can be read from. Trained that way alone,
the tiny model learns the other tasks and not Morse. The generator knows where each letter is
(tasks.letter_spans), so each audio token of a morse clip gets a target of its own: the letter whose first
to last element spans the token's middle, or "none" in the gaps and the silence around. A linear head over
the audio embeddings (the projector's output, the rows the decoder reads) is scored on those targets, and
its loss, times TrainConfig.letter_loss, is added to the model's: the encoder and projector learn to say
which letter sounds where, and the decoder has only to read the letters off in order. Like the auxiliary
CTC losses of hybrid speech recognisers, it shapes training and is not part of the model.

    targets = letter_targets(clips, tokens)   (N,) one per audio row of the batch: 0 none, 1..26 A..Z,
                                               IGNORE_INDEX for the rows of clips of other tasks
    loss = head(audio_rows, targets)          mean cross-entropy over the morse rows (0 if there are none)
    loss_with_letters(model, batch, head, targets, weight)    what a training step minimises, and the
                                               model's own loss
"""

import torch
import torch.nn.functional as F
from torch import nn

from minaf3.loss import IGNORE_INDEX
from minaf3.tasks import MORSE_CODE, Example, letter_spans
from minaf3.windows import TOKEN_SECONDS

LETTERS = tuple(MORSE_CODE)  # target k + 1 is LETTERS[k]; target 0 is "no letter here"


def letter_targets(clips: list[Example], tokens: list[int]) -> torch.Tensor:
    """clips and the number of audio tokens of each -> (sum(tokens),) int64 targets, clip after clip:
    for a morse clip, per token, 1 + the index in LETTERS of the letter whose span holds the token's middle
    (token t covers seconds [t, t + 1) * TOKEN_SECONDS), else 0; IGNORE_INDEX for other tasks' tokens."""
    parts = []
    for clip, n in zip(clips, tokens, strict=True):
        if clip.task != "morse":
            parts.append(torch.full((n,), IGNORE_INDEX, dtype=torch.long))
            continue
        middles = (torch.arange(n, dtype=torch.float64) + 0.5) * TOKEN_SECONDS
        target = torch.zeros(n, dtype=torch.long)
        for letter, start, end in letter_spans(clip):
            target[(middles >= start) & (middles < end)] = 1 + LETTERS.index(letter)
        parts.append(target)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


class LetterHead(nn.Module):
    """Audio rows (N, D) -> logits (N, 1 + 26) over "no letter" and A..Z; called with targets, the loss."""

    def __init__(self, hidden: int, seed: int = 0):
        super().__init__()
        self.proj = nn.Linear(hidden, 1 + len(LETTERS))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # the model's own initialisation (model.init_weights): normal(0.02), zero bias
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=generator) * 0.02)
            self.proj.bias.zero_()

    def forward(self, audio: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """audio (N, D), targets (N,) from letter_targets -> mean cross-entropy (float32 scalar) over the
        rows whose target is not IGNORE_INDEX; a zero that still reaches the head's weights if none is."""
        scored = targets != IGNORE_INDEX
        logits = self.proj(audio[scored]).float()  # (n, 27)
        if not len(logits):
            return logits.sum()  # 0, and every parameter of the head gets a (zero) gradient
        return F.cross_entropy(logits, targets[scored].to(logits.device))


def loss_with_letters(
    model, batch: dict, head: LetterHead, targets: torch.Tensor, weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(model's loss + weight x the head's loss on the audio rows, the model's loss) for a batch of the
    processor's outputs with labels: model(**batch).loss, computed from the same audio embeddings the head
    reads (the rows of `<sound>` tokens after embed_inputs, clip after clip, in time order)."""
    embeds = model.embed_inputs(batch["input_ids"], batch["input_features"], batch["input_features_mask"])
    loss = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    audio = embeds[batch["input_ids"] == model.config.audio_token_id]  # (N, D)
    return loss + weight * head(audio, targets), loss
