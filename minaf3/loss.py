"""The language-model loss: next-token cross-entropy over the labelled positions of a batch.

    causal_lm_loss(logits, labels)        the definition, from every position's logits
    lm_loss(hidden, lm_head, labels)      the same from the last hidden states, computing logits at the
                                          labelled positions only, a chunk at a time

Labels are the processor's (`output_labels=True` or "assistant"): the token each position should hold, or
IGNORE_INDEX where nothing is learned (audio, padding, and with "assistant" everything but the answers).
Position t is scored on predicting labels[t + 1].
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # label of positions the loss skips (torch cross_entropy's default ignore_index)
# Labelled positions whose logits the loss computes at once: a chunk's float32 logits are at most
# LOSS_CHUNK_ELEMENTS (256 MiB), so AF3's 151,672-token vocabulary takes 442 positions a chunk.
LOSS_CHUNK_ELEMENTS = 1 << 26


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t + 1 from position t, over labels != -100: the definition.

    logits (B, T, V), labels (B, T). `lm_loss` computes the same from the hidden states without the logits.
    """
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # shifted: the last position predicts nothing
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten().to(logits.device), ignore_index=IGNORE_INDEX
    )


def lm_loss(
    hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, chunk_elements: int = LOSS_CHUNK_ELEMENTS
) -> torch.Tensor:
    """causal_lm_loss(lm_head(hidden), labels) without the logits of positions that are not labelled.

    hidden (B, T, D), labels (B, T) -> the mean cross-entropy, a float32 scalar (NaN with no label at all,
    as the definition). Only the N positions whose next label is not -100 go through lm_head, a chunk of
    rows at a time whose float32 logits hold at most `chunk_elements` numbers; under autograd each chunk's
    logits are recomputed in the backward pass rather than kept, so training holds (N, D) hidden rows, never
    (N, V) logits. At AF3's vocabulary a batch's logits over every position are gigabytes.
    """
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].to(hidden.device)  # (B, T), shifted left
    labelled = targets != IGNORE_INDEX
    rows, wanted = hidden[labelled], targets[labelled]  # (N, D), (N,)
    step = max(1, chunk_elements // lm_head.out_features)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, len(rows), step):
        part = (lm_head, rows[start : start + step], wanted[start : start + step])
        if torch.is_grad_enabled():
            total = total + checkpoint(_summed_cross_entropy, *part, use_reentrant=False)
        else:
            total = total + _summed_cross_entropy(*part)
    return total / len(rows)


def _summed_cross_entropy(lm_head: nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """rows (n, D), targets (n,) -> the sum of the n cross-entropies, computed in float32."""
    return F.cross_entropy(lm_head(rows).float(), targets, reduction="sum")
