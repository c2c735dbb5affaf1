"""Generation against transformers' generate (fp32): tokens, logits, stopping, limits, streaming, threads.

Inputs come from transformers' processor, so these tests do not depend on minaf3's. Batches that the
reference processor refuses (audio mixed with text-only) are collated here by left-padding single inputs.

The shared tiny checkpoint draws its RMSNorm weights around 0, which shrinks the hidden states ~20x: its
logits have std ~0.03 and barely depend on positions (moving every decode position by 50 changes them by
~2e-5), so a 1e-4 tolerance could not see a position error. These tests use the same checkpoint with decoder
norm weights near 1 and sharper attention (q/k projections x3), re-saved by transformers: logits have
std ~0.6, greedy output is varied, and a position off by one changes the logits by more than 1.
"""

import shutil
import threading
from types import SimpleNamespace

import pytest
import torch
from conftest import SR, run_python, speech_like
from hypothesis import given, settings
from hypothesis import strategies as st

from minaf3 import AudioFlamingo3ForConditionalGeneration, GenerationError, InputError
from minaf3.streamer import TextIteratorStreamer

N = 32  # new tokens in parity tests: long enough for cache and position errors to show


def audio_turn(question: str, seconds: float, seed: int) -> list[dict]:
    audio = speech_like(int(seconds * SR), SR, seed)
    return [
        {"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": question}]}
    ]


def text_turns(*texts: str) -> list[dict]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": [{"type": "text", "text": t}]} for i, t in enumerate(texts)]


CONVERSATIONS = {
    "short_audio": audio_turn("What is in this audio?", 2.0, seed=0),
    "long_audio": audio_turn("Transcribe the input speech.", 5.0, seed=1),
    "two_windows": audio_turn("Describe the sound in detail.", 30.5, seed=2),
    "text": text_turns("Is this music happy or sad?"),
    "multi_turn": text_turns(
        "Transcribe the input speech.", "hello world.", "Which instruments can you hear?"
    ),
}


def process(processor, names: list[str]) -> dict:
    convs = [CONVERSATIONS[n] for n in names]
    return dict(
        processor.apply_chat_template(convs, tokenize=True, add_generation_prompt=True, return_dict=True)
    )


def collate(singles: list[dict], pad_id: int) -> dict:
    """Left-pad single-conversation inputs into one batch; audio windows concatenated in row order."""
    T = max(s["input_ids"].shape[1] for s in singles)

    def left_pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (T - x.shape[1], 0), value=value)  # (1, t) -> (1, T)

    batch = {
        "input_ids": torch.cat([left_pad(s["input_ids"], pad_id) for s in singles]),
        "attention_mask": torch.cat([left_pad(s["attention_mask"], 0) for s in singles]),
    }
    audio = [s for s in singles if "input_features" in s]
    if audio:
        batch["input_features"] = torch.cat([s["input_features"] for s in audio])
        batch["input_features_mask"] = torch.cat([s["input_features_mask"] for s in audio])
    return batch


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with position-sensitive, non-flat decoder logits (see the module docstring)."""
    from transformers import AudioFlamingo3ForConditionalGeneration as Reference

    path = tmp_path_factory.mktemp("af3_sharp")
    shutil.copytree(tiny_checkpoint, path, dirs_exist_ok=True)  # processor and generation files
    reference = Reference.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "language_model" in name and "norm" in name:
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
            elif "language_model" in name and ("q_proj" in name or "k_proj" in name):
                param.mul_(3.0)
    reference.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return AudioFlamingo3ForConditionalGeneration.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def reference(checkpoint):
    from transformers import AudioFlamingo3ForConditionalGeneration as Reference

    return Reference.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def singles(reference_processor) -> dict:
    return {name: process(reference_processor, [name]) for name in CONVERSATIONS}


@pytest.fixture(scope="module")
def audio_batch(reference_processor) -> dict:
    """Two audio conversations of different lengths, left-padded by the reference processor."""
    return process(reference_processor, ["short_audio", "long_audio"])


def new_tokens(sequences: torch.Tensor, inputs: dict) -> torch.Tensor:
    return sequences[:, inputs["input_ids"].shape[1] :]


def greedy(model, inputs: dict, n: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of n new tokens (eos held back unless kwargs say otherwise).

    Returns the new tokens (B, n) and the raw logits of each step (B, n, V).
    """
    kwargs = {"do_sample": False, "max_new_tokens": n, "min_new_tokens": n, **kwargs}
    out = model.generate(**inputs, **kwargs, return_dict_in_generate=True, output_logits=True)
    return new_tokens(out.sequences, inputs), torch.stack(out.logits, dim=1)  # n x (B, V) -> (B, n, V)


# ---- parity with transformers' generate --------------------------------------------------------------------
@pytest.mark.parametrize("penalty", [None, 1.0, 1.5])  # None: the checkpoint's 1.05
def test_greedy_matches_reference_on_audio_batch(model, reference, audio_batch, penalty):
    assert audio_batch["attention_mask"][0, 0] == 0  # the rows differ in length: left padding is exercised
    kwargs = dict(do_sample=False, max_new_tokens=N, min_new_tokens=N)
    if penalty is not None:
        kwargs["repetition_penalty"] = penalty
    expected = reference.generate(**audio_batch, **kwargs)
    ours = model.generate(**audio_batch, **kwargs)
    assert ours.shape == (2, audio_batch["input_ids"].shape[1] + N)
    assert torch.equal(ours, expected)


def test_greedy_matches_reference_after_a_long_prompt(model, reference, reference_processor):
    """Two minutes of audio (four windows, 3000 audio tokens) and a question: prefill through sdpa's causal
    kernel, then steps whose attention reads thousands of filled slots of the cache."""
    inputs = dict(reference_processor.apply_chat_template(
        [audio_turn("Describe the sound in detail.", 120.0, seed=3)],
        tokenize=True, add_generation_prompt=True, return_dict=True,
    ))  # fmt: skip
    assert inputs["input_ids"].shape[1] > 3000
    kwargs = dict(do_sample=False, max_new_tokens=N, min_new_tokens=N)
    assert torch.equal(model.generate(**inputs, **kwargs), reference.generate(**inputs, **kwargs))


def test_greedy_matches_reference_text_only(model, reference, reference_processor):
    inputs = process(reference_processor, ["text", "multi_turn"])
    kwargs = dict(do_sample=False, max_new_tokens=N, min_new_tokens=N)
    assert torch.equal(model.generate(**inputs, **kwargs), reference.generate(**inputs, **kwargs))


def test_rows_stop_at_different_steps_like_reference(model, reference, audio_batch):
    rows = greedy(model, audio_batch, N, eos_token_id=[])[0].tolist()
    # As eos, a token row 0 emits at least two steps before row 1 does: row 0 stops first and is padded.
    step = {t: [row.index(t) if t in row else N for row in rows] for t in rows[0]}
    eos = next(t for t, (i, j) in step.items() if 0 < i < j - 1)
    kwargs = dict(do_sample=False, max_new_tokens=N, eos_token_id=[eos], pad_token_id=0)
    ours = model.generate(**audio_batch, **kwargs)
    assert torch.equal(ours, reference.generate(**audio_batch, **kwargs))
    row0 = new_tokens(ours, audio_batch)[0]
    assert row0[step[eos][0]] == eos and (row0[step[eos][0] + 1 :] == 0).all()


def test_decode_logits_equal_uncached_forward(model, audio_batch):
    """Each step's cached logits equal one forward over the whole sequence, with positions from the mask."""
    n, T = 12, audio_batch["input_ids"].shape[1]
    tokens, logits = greedy(model, audio_batch, n)
    sequence = torch.cat([audio_batch["input_ids"], tokens], dim=1)[:, :-1]  # the last token is never fed
    mask = torch.cat([audio_batch["attention_mask"], torch.ones_like(tokens)], dim=1)[:, :-1]
    with torch.no_grad():
        full = model(
            sequence,
            attention_mask=mask,
            input_features=audio_batch["input_features"],
            input_features_mask=audio_batch["input_features_mask"],
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        ).logits
    assert (logits - full[:, T - 1 :]).abs().max() < 1e-4


# ---- batch invariance -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def alone(model, singles) -> dict:
    """Each conversation generated on its own: new tokens (1, n) and logits (1, n, V)."""
    return {name: greedy(model, inputs, 10) for name, inputs in singles.items()}


@settings(max_examples=8, deadline=None)
@given(names=st.lists(st.sampled_from(sorted(CONVERSATIONS)), min_size=2, max_size=4))
def test_batch_rows_equal_each_conversation_alone(model, singles, alone, reference_processor, names):
    batch = collate([singles[n] for n in names], reference_processor.tokenizer.pad_token_id)
    tokens, logits = greedy(model, batch, 10)
    for row, name in enumerate(names):
        assert torch.equal(tokens[row], alone[name][0][0]), name
        assert (logits[row] - alone[name][1][0]).abs().max() < 1e-4, name


# ---- sampling ----------------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible(model, audio_batch):
    def run(seed):
        return model.generate(
            **audio_batch,
            do_sample=True,
            temperature=1.5,
            max_new_tokens=12,
            generator=torch.Generator().manual_seed(seed),
        )

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


@pytest.mark.parametrize("option", [dict(top_k=1), dict(temperature=1e-4), dict(top_p=1e-6)])
def test_extreme_sampling_options_equal_greedy(model, audio_batch, option):
    neutral = dict(top_k=0, top_p=1.0, temperature=1.0)  # so that only `option` narrows the draw
    sampled = greedy(model, audio_batch, 16, **dict(neutral, **option, do_sample=True))[0]
    assert torch.equal(sampled, greedy(model, audio_batch, 16)[0])


def test_repetition_penalty_moves_repeats_in_the_expected_direction(model, audio_batch):
    def repeats(penalty: float) -> int:
        tokens = greedy(model, audio_batch, 24, repetition_penalty=penalty)[0]
        return sum(len(row) - len(set(row.tolist())) for row in tokens)

    assert repeats(3.0) < repeats(1.0) <= repeats(0.5)


# ---- stopping and limits -----------------------------------------------------------------------------------
def test_stops_at_any_eos_in_the_list(model, singles):
    inputs = singles["long_audio"]
    free = greedy(model, inputs, N, eos_token_id=[])[0][0].tolist()
    by_first_step = sorted(set(free), key=free.index)
    early, late = by_first_step[1], by_first_step[-1]  # two tokens that first appear steps apart
    for eos, stop in (([late], late), ([late, early], early), ([early, late], early)):
        out = model.generate(**inputs, do_sample=False, max_new_tokens=N, eos_token_id=eos)
        assert new_tokens(out, inputs)[0].tolist() == free[: free.index(stop) + 1], eos


def test_stops_cleanly_at_max_new_tokens(model, audio_batch):
    T = audio_batch["input_ids"].shape[1]
    for n in (1, 5):
        out = model.generate(**audio_batch, do_sample=False, max_new_tokens=n, eos_token_id=[])
        assert out.shape == (2, T + n) and torch.equal(out[:, :T], audio_batch["input_ids"])
    assert model.language_model.cache_shape is None  # the cache is given back after each call


def test_prompt_plus_max_new_tokens_beyond_context_is_refused_up_front(model, audio_batch):
    T, context = audio_batch["input_ids"].shape[1], model.config.decoder.max_position_embeddings
    with pytest.raises(GenerationError) as err:
        model.generate(**audio_batch, max_new_tokens=context - T + 1)
    for number in (T, context - T + 1, context + 1, context):
        assert str(number) in str(err.value)
    assert model.language_model.cache_shape is None


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(do_sample=True, temperature=0.0), "temperature=0.0"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(top_k=-1), "top_k=-1"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(num_beams=4), "num_beams=4 is not supported"),
        (dict(stop_strings=["."]), "unknown argument 'stop_strings'"),
        # A stand-in for a CUDA generator, which a CPU-only machine cannot create.
        (dict(generator=SimpleNamespace(device=torch.device("cuda", 0))), "generator is on cuda:0"),
    ],
)
def test_bad_settings_raise_generation_error(model, singles, bad, message):
    with pytest.raises(GenerationError, match=message):
        model.generate(**singles["text"], **bad)


def test_neutral_reference_arguments_are_accepted(model, singles):
    inputs = dict(singles["text"], labels=singles["text"]["input_ids"])
    out = model.generate(**inputs, use_cache=True, num_beams=1, max_new_tokens=2, eos_token_id=[])
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_malformed_inputs_raise_input_error(model, audio_batch, singles):
    ids, mask = audio_batch["input_ids"], audio_batch["attention_mask"]
    with pytest.raises(InputError, match="sample 0: the prompt ends in padding"):
        model.generate(ids.flip(1), attention_mask=mask.flip(1))
    with pytest.raises(InputError, match="shape"):
        model.generate(ids[0])
    with pytest.raises(InputError, match="attention_mask has shape"):
        model.generate(ids, attention_mask=mask[:, 1:])
    with pytest.raises(InputError, match="sample 1: token id 400 is outside the vocabulary"):
        model.generate(torch.stack([ids[0], ids[1].clone().fill_(400)]), attention_mask=mask)
    with pytest.raises(InputError, match="no input_features"):
        model.generate(**{k: v for k, v in audio_batch.items() if k != "input_features"})


# ---- streaming and threads ---------------------------------------------------------------------------------
def test_streamer_pieces_concatenate_to_the_decoded_output(model, singles, reference_processor):
    inputs, tokenizer = singles["long_audio"], reference_processor.tokenizer
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(
            out=model.generate(**inputs, do_sample=False, max_new_tokens=24, streamer=streamer)
        )
    )
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert len(pieces) > 1
    assert "".join(pieces) == tokenizer.decode(new_tokens(result["out"], inputs)[0], skip_special_tokens=True)


def test_streamer_receives_generation_errors(model, audio_batch, reference_processor):
    streamer = TextIteratorStreamer(reference_processor.tokenizer, timeout=30)
    with pytest.raises(GenerationError, match="streams one sequence"):
        model.generate(**audio_batch, streamer=streamer)
    with pytest.raises(GenerationError, match="streams one sequence"):
        next(streamer)


def test_concurrent_calls_equal_sequential_calls(model, singles):
    inputs = [singles["short_audio"], singles["text"], singles["long_audio"], singles["multi_turn"]]
    sequential = [model.generate(**x, do_sample=False, max_new_tokens=8) for x in inputs]
    results = [None] * len(inputs)

    def work(i):
        results[i] = model.generate(**inputs[i], do_sample=False, max_new_tokens=8)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for a, b in zip(results, sequential, strict=True))


def test_defaults_come_from_the_checkpoint_generation_config(model, singles):
    config = model.generation_config
    assert config.do_sample and config.top_k == 20 and config.max_new_tokens == 20
    generator = torch.Generator().manual_seed(3)
    out = model.generate(**singles["text"], generator=generator)
    assert singles["text"]["input_ids"].shape[1] < out.shape[1] <= singles["text"]["input_ids"].shape[1] + 20
    assert torch.equal(out, model.generate(**singles["text"], generator=torch.Generator().manual_seed(3)))


def test_generator_must_be_a_torch_generator(model, audio_batch):
    with pytest.raises(GenerationError, match="generator must be a torch.Generator, got int"):
        model.generate(**audio_batch, max_new_tokens=2, do_sample=True, generator=5)


def test_nan_logits_are_an_error_not_token_zero(tiny_checkpoint, audio_batch):
    """Corrupt weights must not decode silently as token 0: generation names the step instead."""
    broken = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        broken.lm_head.weight[7, 0] = float("nan")
    with pytest.raises(GenerationError, match="NaN logits at generation step 0"):
        broken.generate(**audio_batch, max_new_tokens=3, do_sample=False)


EAGER_GENERATE = """
import sys, torch
from minaf3 import AudioFlamingo3ForConditionalGeneration
model = AudioFlamingo3ForConditionalGeneration.from_pretrained({path!r})
model.generate(torch.ones(1, 5, dtype=torch.long), max_new_tokens=3)
print(sorted(name for name in ("torch._dynamo", "transformers") if name in sys.modules))
"""


def test_eager_generation_never_imports_torch_compile(tiny_checkpoint):
    """torch._dynamo costs about a second to import: eager decoding (fusing, the C++ kernels) must not pull
    it in; only compile=True or quantize= may."""
    done = run_python(EAGER_GENERATE.format(path=str(tiny_checkpoint)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "[]"
