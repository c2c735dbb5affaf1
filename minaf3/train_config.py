"""What a training run does: `TrainConfig`, the recipe (model sizes, tasks, optimisation, bookkeeping),
checked when it is made, and `learning_rate`, its schedule. The defaults are the shipped model's recipe
(minaf3/tiny); train.py runs it and the README says why each choice was made.
"""

import argparse
import dataclasses
import math
from dataclasses import dataclass

from minaf3.config import AudioFlamingo3Config
from minaf3.demo import SPECIAL_TOKENS, model_config
from minaf3.errors import ConfigError
from minaf3.tasks import ALL_TASKS, TASKS


@dataclass(frozen=True)
class TrainConfig:
    """One training run. The defaults are the recipe of the model minaf3 ships (minaf3/tiny)."""

    # the model: encoder (audio_*) and decoder (text_*) sizes, and the BPE vocabulary's upper bound
    audio_layers: int = 2
    audio_hidden: int = 128
    audio_heads: int = 4
    audio_intermediate: int = 512
    text_layers: int = 4
    text_hidden: int = 192
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 448
    vocab_size: int = 512
    # the data: which tasks, how often each is drawn, clips per step, steps whose clips are sorted together
    tasks: tuple[str, ...] = TASKS
    task_weights: tuple[float, ...] = (2.5, 0.75, 1.0, 1.25, 1.0, 3.0)
    # a curriculum: the first listen_steps steps draw only these tasks, whose answers a clip's length
    # cannot give away, so the encoder learns to hear before count and duration reward reading lengths
    listen_tasks: tuple[str, ...] = ("pitch", "kind", "loudness")
    listen_steps: int = 300
    # aids to counting and reading Morse: the weights of sound_heads.py's losses (each audio token's beep
    # number, each audio token's letter), 0: none
    beep_loss: float = 1.0
    letter_loss: float = 1.0
    batch_size: int = 16
    pool_batches: int = 8
    # the optimisation
    steps: int = 7000
    lr: float = 1e-3
    min_lr: float = 5e-5
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    bf16: bool = True  # matrix products in bf16 (autocast) on CPUs with bf16 instructions (dtypes.py)
    # bookkeeping: none of it changes the weights
    log_every: int = 10
    save_every: int = 500
    eval_every: int = 0  # steps between evaluations on eval_clips clips per task; 0: none
    eval_clips: int = 8
    threads: int = 0  # torch threads per process; 0: the cores shared among torchrun's processes, else all

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"train: {field.name} must be an integer, got {value!r}")
            if field.type is bool and not isinstance(value, bool):
                raise ConfigError(f"train: {field.name} must be True or False, got {value!r}")
            if field.type is float and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ConfigError(f"train: {field.name} must be a number, got {value!r}")
        at_least = {"steps": 1, "batch_size": 1, "pool_batches": 1, "log_every": 1, "save_every": 1}
        at_least |= {"listen_steps": 0}
        at_least |= {"eval_clips": 1, "vocab_size": len(SPECIAL_TOKENS) + 256}
        for name, low in (at_least | {"warmup_steps": 0, "eval_every": 0, "seed": 0, "threads": 0}).items():
            if getattr(self, name) < low:
                raise ConfigError(f"train: {name} must be >= {low}, got {getattr(self, name)}")
        if not 0 <= self.min_lr <= self.lr or not self.lr > 0:
            raise ConfigError(
                f"train: need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}"
            )
        for name in ("weight_decay", "beep_loss", "letter_loss"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train: {name} must be >= 0, got {getattr(self, name)}")
        if self.grad_clip <= 0:
            raise ConfigError(f"train: grad_clip must be > 0, got {self.grad_clip}")
        unknown = [t for t in (*self.tasks, *self.listen_tasks) if t not in ALL_TASKS]
        if not self.tasks or unknown:
            raise ConfigError(
                f"train: tasks and listen_tasks must name some of {', '.join(ALL_TASKS)}; "
                f"got {list(self.tasks)} and {list(self.listen_tasks)}"
            )
        weights = self.task_weights
        if len(weights) != len(self.tasks) or min(weights) < 0 or not sum(weights) > 0:
            raise ConfigError(
                f"train: task_weights needs one weight >= 0 per task ({len(self.tasks)}), not all 0; "
                f"got {list(weights)}"
            )
        listened = sum(w for t, w in zip(self.tasks, weights, strict=True) if t in self.listen_tasks)
        if self.listen_steps and not listened > 0:
            raise ConfigError(
                f"train: listen_tasks {list(self.listen_tasks)} hold none of the weighted tasks; with "
                f"listen_steps={self.listen_steps} the first steps would have no task to draw"
            )
        if self.text_hidden % self.text_heads or self.text_hidden // self.text_heads % 2:
            raise ConfigError(
                f"train: text_hidden ({self.text_hidden}) must be text_heads ({self.text_heads}) times an "
                "even head width (RoPE rotates pairs of channels)"
            )
        AudioFlamingo3Config.from_dict(model_config(self.vocab_size, **self.sizes()))  # sizes that fit

    def sizes(self) -> dict[str, int]:
        """The model's sizes, as demo.model_config takes them."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name[:5] in ("audio", "text_")
        }


BOOKKEEPING = ("log_every", "save_every", "eval_every", "eval_clips", "threads")  # a resume may change these


def add_options(parser, config_class, tuples: dict[str, dict]) -> None:
    """One command-line option per field of the dataclass `config_class` (--field-name, the field's default);
    a tuple field takes several values, with the add_argument keywords `tuples[name]` (type, choices)."""
    for field in dataclasses.fields(config_class):
        option = "--" + field.name.replace("_", "-")
        if field.name in tuples:
            parser.add_argument(option, nargs="+", default=field.default, metavar="X", **tuples[field.name])
        elif field.type is bool:
            parser.add_argument(option, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            parser.add_argument(option, type=field.type, default=field.default, metavar="N")


def from_options(config_class, args: argparse.Namespace):
    """The `config_class` that parsed options (add_options) describe; lists become tuples."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)}
    return config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup from lr / warmup_steps to lr, then a cosine from lr down to min_lr at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - 1 - config.warmup_steps)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def aid_weights(config: TrainConfig) -> dict[str, float]:
    """{task: weight} of the span heads (sound_heads.py) that train beside the model: count's and morse's,
    when the task is trained and its weight is not 0."""
    weights = {"count": config.beep_loss, "morse": config.letter_loss}
    return {task: w for task, w in weights.items() if w and task in config.tasks}
