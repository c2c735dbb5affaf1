"""Generation settings, and how they choose the next token from the logits.

`GenerationConfig` precedence, as in transformers: an argument given to `generate` > the checkpoint's
generation_config.json > transformers' global defaults (greedy, 20 new tokens, temperature 1, top_k 50,
top_p 1, no repetition penalty) with bos/eos from the model's config.json. AF3's checkpoint ships do_sample
True, temperature 0.7, top_k 20, top_p 0.8, repetition_penalty 1.05, eos [151645, 151643], pad 151643.
`max_length` (prompt included) is not read: minaf3 counts new tokens only.

Choosing a token, in the order transformers' `_get_logits_processor` builds its processors:

    logits (B, V) float32, the last position's raw scores
      repetition_penalty    tokens already in the row (prompt and generated) are made less likely
      suppress_tokens       eos forbidden while fewer than min_new_tokens tokens are out
      -- only when sampling --
      temperature           scores / t
      top_k_filter          keep the k highest scores
      top_p_filter          keep the smallest set of tokens whose probability reaches p
    -> scores (B, V), masked entries set to -inf
      sample                argmax (greedy) or one draw from softmax(scores) -> tokens (B,) long

Each processor is a plain function reproducing one of transformers' `RepetitionPenaltyLogitsProcessor`,
`MinNewTokensLengthLogitsProcessor`, `TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper`
exactly (tests/test_sampling.py compares them on random logits). A neutral setting skips its step, as in
the reference: temperature 1, top_k 0, top_p 1, repetition_penalty 1.

`choose_tokens` is what generate calls: process_logits then sample, except that when it samples from the
top k on the CPU it gathers the k candidates first and runs top_p and the draw on them alone (the same
distribution; among exactly equal scores at top_p's edge, which one stays follows torch's unstable sort,
as in the reference, but over fewer elements).

Repetition bookkeeping avoids the reference's growing `input_ids`: a boolean table `seen` (B, V) marks the
tokens each row holds, filled from the prompt once and updated in place with each new token.
"""

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import AudioFlamingo3Config
from .errors import ConfigError, GenerationError

FILE_NAME = "generation_config.json"
# What minaf3.load(...).chat, transcribe and the commands ask for: the model card's output limit, where the
# shipped generation config (and GenerationConfig's own default) says 20.
DEFAULT_MAX_NEW_TOKENS = 1024
NEG_INF = float("-inf")
# New tokens for chat and transcribe when the caller names none: the model card's output limit (the shipped
# generation_config.json says 20, too few for a description or a transcript).
DEFAULT_MAX_NEW_TOKENS = 1024


@dataclass(frozen=True)
class GenerationConfig:
    """Validated generation settings; change them with `replace(...)`, which validates again.

    eos_token_id is a tuple of ids (any of them stops a row); pad_token_id None means eos_token_id[0], the
    reference's fallback.
    """

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        eos = self.eos_token_id
        if eos is None:
            eos = ()
        elif isinstance(eos, int) and not isinstance(eos, bool):
            eos = (eos,)
        elif isinstance(eos, (list, tuple)):
            eos = tuple(eos)
        else:
            raise GenerationError(f"eos_token_id={eos!r}: expected an id or a list of ids")
        object.__setattr__(self, "eos_token_id", eos)
        self.validate()

    def validate(self) -> None:
        """Raise GenerationError naming the first setting out of range."""
        _int(self.max_new_tokens, "max_new_tokens", low=1)
        _int(self.min_new_tokens, "min_new_tokens", low=0)
        if not isinstance(self.do_sample, bool):
            raise GenerationError(f"do_sample={self.do_sample!r}: expected True or False")
        _real(self.temperature, "temperature")
        if self.do_sample and self.temperature <= 0:
            raise GenerationError(
                f"temperature={self.temperature} with do_sample=True: the temperature must be > 0 "
                "(for greedy decoding pass do_sample=False)"
            )
        _int(self.top_k, "top_k", low=0)
        _real(self.top_p, "top_p")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p={self.top_p}: must be in (0, 1]")
        _real(self.repetition_penalty, "repetition_penalty")
        if self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty={self.repetition_penalty}: must be > 0 (1 means none)")
        for token in self.eos_token_id:
            _int(token, "eos_token_id", low=0)
        for name in ("pad_token_id", "bos_token_id"):
            if getattr(self, name) is not None:
                _int(getattr(self, name), name, low=0)

    def replace(self, **overrides) -> "GenerationConfig":
        """A copy with the given settings changed; None leaves a setting as it is."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_dict(cls, data: dict, model_config: AudioFlamingo3Config | None = None) -> "GenerationConfig":
        """Settings from a generation_config.json dict (unknown keys ignored; missing ones: the defaults).

        bos/eos missing from `data` come from the model's text config, as transformers fills them.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known and v is not None}
        if model_config is not None:
            decoder = model_config.decoder
            values.setdefault("eos_token_id", decoder.eos_token_id)
            values.setdefault("bos_token_id", decoder.bos_token_id)
        return cls(**{k: v for k, v in values.items() if v is not None})

    @classmethod
    def from_model_config(cls, model_config: AudioFlamingo3Config) -> "GenerationConfig":
        """transformers' defaults with bos/eos from the model config (a checkpoint without the file)."""
        return cls.from_dict({}, model_config)

    @classmethod
    def from_pretrained(cls, path: str | Path, model_config: AudioFlamingo3Config) -> "GenerationConfig":
        """Read `generation_config.json` from a checkpoint folder, or fall back to `from_model_config`."""
        file = Path(path) / FILE_NAME
        if not file.is_file():
            return cls.from_model_config(model_config)
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data, model_config)
        except GenerationError as e:
            raise ConfigError(f"{file}: {e}") from None


def seen_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """input_ids, attention_mask (B, T) -> seen (B, V) bool: True for every id that a real prompt token holds.

    Padding is left out, as the reference leaves out each row's leading padding (`prompt_ignore_length`).
    Ids at or beyond the lm_head's vocabulary cannot be generated, so they are dropped as the reference does.
    """
    seen = torch.zeros(input_ids.shape[0], vocab_size + 1, dtype=torch.bool, device=input_ids.device)
    # Padding and out-of-vocabulary ids all land in the extra column V, which is cut off afterwards.
    ids = input_ids.masked_fill(attention_mask == 0, vocab_size).clamp(0, vocab_size)
    seen.scatter_(1, ids, True)
    return seen[:, :vocab_size]


def mark_seen_(seen: torch.Tensor, tokens: torch.Tensor) -> None:
    """seen (B, V) bool, tokens (B,) long: mark each row's new token, in place."""
    seen.scatter_(1, tokens[:, None], True)


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores of seen tokens divided by `penalty` when positive and multiplied by it when negative.

    Either way a penalty > 1 lowers the token's score and a penalty < 1 raises it; each token is penalised
    once however often it occurs. logits (B, V), seen (B, V) bool -> (B, V).
    """
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def suppress_tokens(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """logits (B, V) with the columns `token_ids` (n,) set to -inf (ids outside 0..V-1 are ignored)."""
    V = logits.shape[-1]
    # Ids outside the vocabulary mark an extra last column, cut off again: no host synchronisation to filter
    # them, and work in n rather than a search over the whole vocabulary (torch.isin on every id).
    ids = torch.where((token_ids >= 0) & (token_ids < V), token_ids, V)
    return F.pad(logits, (0, 1)).index_fill_(-1, ids, NEG_INF)[..., :V]


def temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    """logits / t: t < 1 sharpens the distribution, t > 1 flattens it."""
    return logits / t


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the scores >= the k-th highest of each row (ties at the threshold survive), -inf elsewhere."""
    k = min(k, logits.shape[-1])
    threshold = torch.topk(logits, k).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < threshold, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: drop the least likely tokens whose probabilities sum to at most 1 - p.

    What survives is the smallest set of most likely tokens whose probability reaches p; the most likely
    token always survives, so p -> 0 is greedy. Sorting ascending and comparing the running sum with 1 - p
    (rather than descending with p) is the reference's formulation, kept so ties at the edge resolve alike.
    """
    sorted_logits, order = torch.sort(logits, descending=False)  # (B, V) ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - p)
    drop_sorted[..., -1:] = False  # the most likely token
    drop = drop_sorted.scatter(1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, NEG_INF)


def process_logits(
    logits: torch.Tensor,
    config: GenerationConfig,
    seen: torch.Tensor | None,
    num_new_tokens: int,
    eos_ids: torch.Tensor | None,
) -> torch.Tensor:
    """Raw logits (B, V) float32 -> scores (B, V) to choose from, in the reference's processor order.

    seen: (B, V) bool table of `seen_tokens` (needed when repetition_penalty != 1).
    num_new_tokens: tokens generated so far (0 when choosing the first one).
    eos_ids: (n,) long, the end-of-sequence ids that min_new_tokens holds back (None: no eos).
    """
    scores = adjusted_scores(logits, config, seen, num_new_tokens, eos_ids)
    if config.do_sample:
        if config.top_k != 0:
            scores = top_k_filter(scores, config.top_k)
        if config.top_p < 1.0:
            scores = top_p_filter(scores, config.top_p)
    return scores


def adjusted_scores(
    logits: torch.Tensor,
    config: GenerationConfig,
    seen: torch.Tensor | None,
    num_new_tokens: int,
    eos_ids: torch.Tensor | None,
) -> torch.Tensor:
    """The element-wise steps of process_logits (repetition penalty, eos ban, temperature): no filter."""
    scores = logits
    if config.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, seen, config.repetition_penalty)
    if eos_ids is not None and num_new_tokens < config.min_new_tokens:
        scores = suppress_tokens(scores, eos_ids)
    if config.do_sample and config.temperature != 1.0:
        scores = temperature(scores, config.temperature)
    return scores


def top_k_candidates(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores top_k_filter keeps, gathered: values, index (B, n), highest first, n >= k.

    A row keeps every score >= its k-th highest, so a tie at that threshold can keep more than k. The
    k + 1 highest show whether one does (the (k+1)-th then equals the k-th); only then are the scores
    counted, n being the most any row keeps. Entries a row does not keep (such as the (k+1)-th) are -inf.
    """
    V = scores.shape[-1]
    k = min(k, V)
    values, index = torch.topk(scores, min(k + 1, V))  # (B, k + 1)
    threshold = values[..., k - 1 : k]  # (B, 1): the k-th highest, as in top_k_filter
    if k < V and bool((values[..., k] >= threshold[..., 0]).any()):  # a tie reaches past k (rare)
        values, index = torch.topk(scores, int((scores >= threshold).sum(-1).max()))
    return values.masked_fill(values < threshold, NEG_INF), index


def choose_tokens(
    logits: torch.Tensor,
    config: GenerationConfig,
    seen: torch.Tensor | None,
    num_new_tokens: int,
    eos_ids: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of each row, (B,) long: a draw from (or the argmax of) process_logits' scores.

    When sampling from the top k on the CPU, top_p and the draw run on the k candidates only, rather than
    sorting and drawing over the whole vocabulary: the same distribution, without the work on tokens that
    top_k has already given probability 0 (tools/bench_sampling.py times the two). What remains over the
    whole vocabulary is element-wise: the repetition penalty and the temperature. CUDA keeps the
    whole-vocabulary path, which needs no host synchronisation.
    """
    if not (config.do_sample and config.top_k != 0 and logits.device.type == "cpu"):
        return sample(
            process_logits(logits, config, seen, num_new_tokens, eos_ids), config.do_sample, generator
        )
    scores = adjusted_scores(logits, config, seen, num_new_tokens, eos_ids)
    values, index = top_k_candidates(scores, config.top_k)  # (B, n)
    if config.top_p < 1.0:
        values = top_p_filter(values, config.top_p)
    choice = sample(values, True, generator)  # (B,) positions among the candidates
    return index.gather(1, choice[:, None])[:, 0]


def sample(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """scores (B, V) -> tokens (B,) long: the argmax, or one draw from softmax(scores) per row.

    The draw is an exponential race: with E_i ~ Exp(1) independent, argmax_i p_i / E_i = argmin_i E_i / p_i
    and E_i / p_i ~ Exp(rate p_i), so token i wins with probability p_i / sum(p). It is exact, needs no
    host synchronisation (torch.multinomial checks its input on the host), and tokens with p_i = 0 never win.
    `generator` must live on the scores' device.
    """
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    # A zero draw would turn 0 / 0 into NaN (and NaN wins argmax); the smallest normal float is never reached.
    race.clamp_(min=torch.finfo(race.dtype).tiny)
    return (probs / race).argmax(dim=-1)


def _int(value, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GenerationError(f"{name}={value!r}: expected an integer")
    if value < low:
        raise GenerationError(f"{name}={value}: must be >= {low}")


def _real(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GenerationError(f"{name}={value!r}: expected a finite number")
