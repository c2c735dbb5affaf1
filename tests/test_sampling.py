"""Generation settings and token choice: every processor against transformers' own on random logits.

The behavioural reference is transformers' logits processors, and for the whole chain its
`_get_logits_processor`, which decides which processors run and in what order.
"""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minaf3.config import AudioFlamingo3Config
from minaf3.errors import ConfigError, GenerationError
from minaf3.sampling import (
    GenerationConfig,
    adjusted_scores,
    choose_tokens,
    process_logits,
    repetition_penalty,
    sample,
    seen_tokens,
    suppress_tokens,
    temperature,
    top_k_candidates,
    top_k_filter,
    top_p_filter,
)

FAST = settings(max_examples=40, deadline=None)


@st.composite
def logits_and_prompt(draw):
    """Random float32 logits (B, V) with ties, and a left-padded prompt (B, T) whose ids may exceed V."""
    B, V, T = draw(st.integers(1, 3)), draw(st.integers(2, 40)), draw(st.integers(1, 12))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = torch.randn(B, V, generator=gen) * draw(st.sampled_from([0.5, 3.0, 20.0]))
    logits = logits.round(decimals=draw(st.sampled_from([0, 1, 4])))  # coarse rounding makes ties
    ids = torch.randint(0, V + 3, (B, T), generator=gen)  # ids >= V: embedding rows the lm_head lacks
    pads = torch.randint(0, T, (B,), generator=gen)  # every row keeps at least one real token
    mask = (torch.arange(T)[None, :] >= pads[:, None]).long()
    return logits, ids, mask


@FAST
@given(data=logits_and_prompt(), penalty=st.sampled_from([0.5, 0.9, 1.05, 1.5, 3.0]))
def test_repetition_penalty_matches_reference(data, penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    logits, ids, mask = data
    padding = (mask != 0).int().argmax(dim=1)  # what the reference's generate passes
    expected = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=padding)(ids, logits.clone())
    ours = repetition_penalty(logits, seen_tokens(ids, mask, logits.shape[1]), penalty)
    assert torch.equal(ours, expected)


@FAST
@given(data=logits_and_prompt(), t=st.floats(0.01, 5.0), k=st.integers(1, 50), p=st.floats(0.001, 1.0))
def test_warpers_match_reference(data, t, k, p):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits, ids, _ = data
    assert torch.equal(temperature(logits, t), TemperatureLogitsWarper(t)(ids, logits))
    assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(ids, logits))
    assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(ids, logits))


@pytest.mark.parametrize("p", [0.25, 0.5, 0.75, 1.0])
def test_top_p_at_the_exact_boundary_matches_reference(p):
    """Uniform logits make the running sums exact (0.25, 0.5, ...), so a sum equal to 1 - p is tested."""
    from transformers import TopPLogitsWarper

    logits = torch.zeros(1, 4)
    assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(None, logits))


@FAST
@given(data=logits_and_prompt(), generated=st.integers(0, 5), min_new=st.integers(0, 6))
def test_min_new_tokens_matches_reference(data, generated, min_new):
    from transformers import MinNewTokensLengthLogitsProcessor

    logits, ids, mask = data
    eos = [0, logits.shape[1] - 1]
    full = torch.cat([ids, torch.zeros(ids.shape[0], generated, dtype=torch.long)], dim=1)
    expected = MinNewTokensLengthLogitsProcessor(ids.shape[1], min_new, eos)(full, logits)
    config = GenerationConfig(min_new_tokens=min_new)
    assert torch.equal(process_logits(logits, config, None, generated, torch.tensor(eos)), expected)


@settings(max_examples=60, deadline=None)
@given(
    data=logits_and_prompt(),
    generated=st.integers(0, 4),
    do_sample=st.booleans(),
    t=st.sampled_from([0.3, 0.7, 1.0, 2.0]),
    k=st.sampled_from([0, 1, 3, 20, 50]),
    p=st.sampled_from([0.05, 0.5, 0.8, 1.0]),
    penalty=st.sampled_from([0.7, 1.0, 1.05, 2.0]),
    min_new=st.integers(0, 5),
)
def test_processor_chain_matches_reference_order(
    reference_model, data, generated, do_sample, t, k, p, penalty, min_new
):
    """process_logits equals the list transformers' generate builds from the same settings."""
    from transformers import GenerationConfig as ReferenceConfig

    logits, ids, mask = data
    eos = [1, 0]
    settings_ = dict(do_sample=do_sample, temperature=t, top_k=k, top_p=p, repetition_penalty=penalty)
    ref_config = ReferenceConfig(**settings_, min_new_tokens=min_new, eos_token_id=eos, pad_token_id=0)
    reference_model._prepare_special_tokens(ref_config, True, device="cpu")
    processors = reference_model._get_logits_processor(
        ref_config, input_ids_seq_length=ids.shape[1], model_kwargs={"attention_mask": mask}, device="cpu"
    )
    new = torch.randint(0, logits.shape[1], (ids.shape[0], generated))
    full_ids, full_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
    expected = processors(full_ids, logits.clone())

    config = GenerationConfig(**settings_, min_new_tokens=min_new, eos_token_id=eos, pad_token_id=0)
    seen = seen_tokens(full_ids, full_mask, logits.shape[1])
    assert torch.equal(process_logits(logits, config, seen, generated, torch.tensor(eos)), expected)


@FAST
@given(
    data=logits_and_prompt(), k=st.sampled_from([1, 2, 3, 20, 50]), p=st.sampled_from([0.05, 0.5, 0.8, 1.0])
)
def test_top_k_candidates_then_top_p_keep_what_the_whole_vocabulary_filters_keep(data, k, p):
    """choose_tokens' CPU path filters the gathered top-k candidates. Scattered back, they keep exactly the
    scores process_logits keeps. Only among exactly equal scores at top_p's edge may a different token of
    the tie stay: torch's sort is not stable, so the tie's order is the sort's, over the whole vocabulary
    in one case and over the candidates in the other (the strategy's rounding makes many ties)."""
    logits, ids, mask = data
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=k, top_p=p, repetition_penalty=1.3)
    seen = seen_tokens(ids, mask, logits.shape[1])
    scores = adjusted_scores(logits, config, seen, 0, None)
    values, index = top_k_candidates(scores, k)
    kept = top_p_filter(values, p) if p < 1.0 else values
    ours = torch.full_like(logits, float("-inf")).scatter(1, index, kept)
    expected = process_logits(logits, config, seen, 0, None)
    assert torch.equal(ours.sort(-1).values, expected.sort(-1).values)  # the same scores survive
    for row in (ours != expected).any(-1).nonzero().flatten().tolist():
        differ = scores[row, ours[row] != expected[row]]
        assert (differ == differ[0]).all()  # tokens of one tie, swapped


def test_top_k_candidates_keep_every_tie_at_the_threshold():
    scores = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0, 0.0], [4.0, 2.0, 1.0, 0.0, -1.0, -2.0]])
    values, index = top_k_candidates(scores, 2)  # row 0 keeps 5 and all three 3s: four candidates
    assert values.tolist() == [[5.0, 3.0, 3.0, 3.0], [4.0, 2.0, float("-inf"), float("-inf")]]
    assert sorted(index[0].tolist()) == [0, 1, 2, 3] and index[1, :2].tolist() == [0, 1]


def test_choose_tokens_draws_in_proportion_to_the_processed_scores():
    """The candidates-only draw has process_logits' distribution: temperature, top_k 3 of 6, then top_p
    0.8 drops the third candidate (probability 0.14 < 1 - 0.8), leaving two tokens."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.8, -1.0, 0.5]).expand(60_000, -1)
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=3, top_p=0.8)
    expected = process_logits(logits[:1], config, None, 0, None).softmax(-1)[0]
    draws = choose_tokens(logits, config, None, 0, None, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    assert (expected > 0).tolist() == [True, True, False, False, False, False]
    assert (freq[expected == 0] == 0).all()
    assert torch.allclose(freq, expected, atol=0.01)  # binomial standard error <= 0.002 at n = 60,000


def test_suppress_tokens_ignores_ids_beyond_vocabulary():
    logits = torch.zeros(2, 5)
    out = suppress_tokens(logits, torch.tensor([1, 7]))
    assert out[:, 1].eq(float("-inf")).all() and out[:, [0, 2, 3, 4]].eq(0).all()


def test_sample_draws_in_proportion_to_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    scores = probs.log().expand(60_000, -1)  # one draw per row
    draws = sample(scores, do_sample=True, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[4] == 0  # a -inf score is never drawn
    # Binomial standard error <= 0.002 at n = 60,000: 0.01 is five of them.
    assert torch.allclose(freq, probs, atol=0.01)


def test_sample_greedy_and_seeded_draws_are_reproducible():
    scores = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample(scores, do_sample=False), scores.argmax(-1))
    first = sample(scores, True, torch.Generator().manual_seed(7))
    assert torch.equal(first, sample(scores, True, torch.Generator().manual_seed(7)))
    draws = [sample(scores, True, torch.Generator().manual_seed(s)) for s in range(8)]
    assert any(not torch.equal(first, d) for d in draws)


# ---- GenerationConfig ------------------------------------------------------------------------------------
def test_from_pretrained_reads_the_checkpoint_file_like_transformers(tiny_checkpoint):
    from transformers import GenerationConfig as ReferenceConfig

    ours = GenerationConfig.from_pretrained(tiny_checkpoint, AudioFlamingo3Config.from_file(tiny_checkpoint))
    ref = ReferenceConfig.from_pretrained(tiny_checkpoint)
    for name in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "pad_token_id"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert list(ours.eos_token_id) == ref.eos_token_id
    assert ours.max_new_tokens == 20 and ours.min_new_tokens == 0  # transformers' global defaults


def test_from_pretrained_without_file_uses_defaults_and_model_eos(tmp_path, tiny_checkpoint):
    (tmp_path / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    model_config = AudioFlamingo3Config.from_file(tmp_path)
    config = GenerationConfig.from_pretrained(tmp_path, model_config)
    assert config == GenerationConfig(
        eos_token_id=[model_config.decoder.eos_token_id], bos_token_id=model_config.decoder.bos_token_id
    )
    assert config.do_sample is False and config.top_k == 50


@pytest.mark.parametrize(
    "text, message",
    [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"), ('{"top_p": 7}', "top_p=7")],
)
def test_from_pretrained_refuses_a_bad_file(tmp_path, tiny_checkpoint, text, message):
    (tmp_path / "generation_config.json").write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        GenerationConfig.from_pretrained(tmp_path, AudioFlamingo3Config.from_file(tiny_checkpoint))
    assert "generation_config.json" in str(err.value)


def test_replace_keeps_unset_values_and_normalises_eos():
    base = GenerationConfig(do_sample=True, temperature=0.7, eos_token_id=5)
    assert base.eos_token_id == (5,)
    changed = base.replace(temperature=None, top_k=3, eos_token_id=[1, 2])
    assert (changed.temperature, changed.top_k, changed.eos_token_id) == (0.7, 3, (1, 2))
    assert base.replace(eos_token_id=[]).eos_token_id == ()
    assert (
        GenerationConfig(temperature=0.0).temperature == 0.0
    )  # ignored in greedy decoding, as in transformers


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(do_sample=True, temperature=0.0), "temperature=0.0 with do_sample=True"),
        (dict(do_sample=True, temperature=-1), "temperature=-1"),
        (dict(temperature=float("nan")), "temperature=nan"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(top_k=-1), "top_k=-1"),
        (dict(top_k=2.5), "top_k=2.5"),
        (dict(repetition_penalty=0.0), "repetition_penalty=0.0"),
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(max_new_tokens=True), "max_new_tokens=True"),
        (dict(min_new_tokens=-2), "min_new_tokens=-2"),
        (dict(do_sample="yes"), "do_sample='yes'"),
        (dict(eos_token_id=[3, -1]), "eos_token_id=-1"),
        (dict(eos_token_id="eos"), "eos_token_id='eos': expected an id or a list"),
        (dict(pad_token_id=-5), "pad_token_id=-5"),
    ],
)
def test_bad_settings_raise_generation_error(bad, message):
    with pytest.raises(GenerationError, match=message.replace("(", r"\(").replace("[", r"\[")):
        GenerationConfig(**bad)


def test_from_dict_reads_known_keys_and_ignores_others(tiny_checkpoint):
    data = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    config = GenerationConfig.from_dict(dict(data, max_new_tokens=7, unknown_key=1))
    assert config.max_new_tokens == 7 and config.top_k == data["top_k"]
