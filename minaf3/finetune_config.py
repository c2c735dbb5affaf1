"""What a fine-tuning run does: `FinetuneConfig` (the adapter, the optimisation, bookkeeping), checked when
it is made. finetune.py runs it; `minaf3 finetune --help` lists its fields as options.
"""

from dataclasses import dataclass

from minaf3.errors import ConfigError
from minaf3.metrics import check_metric

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# lm_head too, on request: answers in words the base model never said need their output rows moved (a tiny
# model's rows for tokens it never produced decay to about zero in training, and no update to the decoder's
# layers lifts a logit whose row is zero).
TARGETS = (*DECODER_LINEARS, "lm_head")
PROJECTOR = "multi_modal_projector"


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run: the adapter, the optimisation, and bookkeeping (which a resume may change)."""

    lora_rank: int = 16
    lora_alpha: float = 32.0
    targets: tuple[str, ...] = DECODER_LINEARS  # decoder layers by their names' last part, and/or lm_head
    projector: bool = False  # also train the projector in full (saved as PEFT's modules_to_save)
    epochs: int = 1
    steps: int = 0  # 0: epochs x the batches of an epoch
    lr: float = 2e-4
    min_lr: float = 0.0
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 8
    seed: int = 0
    bf16: bool = True  # matrix products in bf16 (autocast) on CPUs with bf16 instructions, as train.py
    # bookkeeping
    log_every: int = 10
    save_every: int = 100
    eval_every: int = 0  # steps between evaluations on --eval-data; 0: at the end only
    metric: str = "exact"

    def __post_init__(self):
        for name in ("lora_rank", "epochs", "batch_size", "log_every", "save_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"finetune: {name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("steps", "warmup_steps", "eval_every", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"finetune: {name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr or not self.lora_alpha > 0:
            raise ConfigError("finetune: need lr > 0, 0 <= min_lr <= lr and lora_alpha > 0")
        if self.weight_decay < 0 or not self.grad_clip > 0:
            raise ConfigError("finetune: weight_decay must be >= 0 and grad_clip > 0")
        unknown = [t for t in self.targets if t not in TARGETS]
        if not self.targets or unknown:
            raise ConfigError(
                f"finetune: targets must be some of {', '.join(TARGETS)}; got {list(self.targets)}"
            )
        check_metric(self.metric)


BOOKKEEPING = ("log_every", "save_every", "eval_every", "metric")  # what a resume may change
