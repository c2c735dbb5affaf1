"""kernels/cpu_attention.cpp: one-token decode attention on the CPU against its definition.

The definition is minaf3/attention.py's eager_attention, run in float64 with the mask attention_mask builds
(causal by slot, and the key mask); the kernel is also checked through `attention(backend="cpp")`, through
decoding (the default on the CPU) against the eager backend, for reading no slot past the query's own, and
for what it refuses. The build-failure fallback runs in a fresh interpreter.
"""

import pytest
import torch
from conftest import run_python
from hypothesis import given, settings
from hypothesis import strategies as st
from minaf3.kernels import cpu_attention
from minaf3.kernels.registry import override

from minaf3 import AudioFlamingo3ForConditionalGeneration, ConfigError
from minaf3.attention import attention, backend_counts, default_backend, eager_attention, use_backend

GREEDY = dict(do_sample=False, repetition_penalty=1.0, eos_token_id=[])


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert cpu_attention.load_library(), "the kernel must build on the test machine"


def definition(q, k, v, key_mask=None, query_slot=None):
    """eager_attention in float64: slot j visible iff j <= query_slot (or any j without one) and key_mask."""
    S = k.shape[2]
    last = S - 1 if query_slot is None else int(query_slot)
    visible = (torch.arange(S) <= last)[None, :]  # (1, S)
    if key_mask is not None:
        visible = visible & key_mask  # (B or 1, S)
    return eager_attention(q.double(), k.double(), v.double(), visible[:, None, None, :])


def problem(batch, kv_heads, groups, slots, head_dim, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * groups, 1, head_dim, generator=g) * scale
    k, v = (torch.randn(batch, kv_heads, slots, head_dim, generator=g) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype), g


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    groups=st.integers(1, 7),  # up to 7 heads per key head: one full register block of 6 and a tail
    slots=st.integers(1, 70),  # blocks of 8 slots and tails
    head_dim=st.sampled_from([1, 4, 8, 12, 16, 24, 64, 128]),  # multiples of 8 and of 16, and tails
    shared_mask=st.booleans(),
    filled=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_float32_kernel_matches_the_definition(
    batch, kv_heads, groups, slots, head_dim, shared_mask, filled, seed
):
    """Random key masks and query slots, including rows that see no slot (zeros on both sides)."""
    q, k, v, g = problem(batch, kv_heads, groups, slots, head_dim, seed)
    key_mask = torch.rand(1 if shared_mask else batch, slots, generator=g) > 0.4
    if not shared_mask:
        key_mask[0] = False
    query_slot = torch.tensor([int(filled * (slots - 1))])
    out = cpu_attention.decode_attention(q, k, v, key_mask, query_slot)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert (out.double() - definition(q, k, v, key_mask, query_slot)).abs().max() < 1e-5


@pytest.mark.parametrize("slots", [700, 5000])
def test_long_caches_split_over_threads_match_the_definition(slots):
    """Enough work to be split into ranges merged at the end (with two threads), or not (one)."""
    q, k, v, g = problem(2, 1, 7, slots + 50, 16, seed=slots)
    key_mask = torch.rand(2, slots + 50, generator=g) > 0.1
    key_mask[1, : slots // 2] = False  # a row whose first ranges see nothing
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = cpu_attention.decode_attention(q, k, v, key_mask, torch.tensor([slots - 1]))
            expected = definition(q, k, v, key_mask, torch.tensor([slots - 1]))
            assert (out.double() - expected).abs().max() < 1e-5
    finally:
        torch.set_num_threads(before)


def test_slots_after_the_query_are_never_read():
    """Slots past query_slot hold NaN (as unwritten memory might): the output is still the definition's."""
    q, k, v, _ = problem(1, 2, 3, 40, 16, seed=2)
    k[:, :, 25:], v[:, :, 25:] = float("nan"), float("nan")
    out = cpu_attention.decode_attention(q, k, v, None, torch.tensor([24]))
    assert not out.isnan().any()
    assert (out.double() - definition(q[:, :, :, :], k[:, :, :25], v[:, :, :25])).abs().max() < 1e-5


@settings(max_examples=20, deadline=None)
@given(
    groups=st.integers(1, 7),
    slots=st.integers(1, 300),
    head_dim=st.sampled_from([16, 64, 128]),
    seed=st.integers(0, 2**16),
)
def test_bfloat16_kernel_matches_the_definition_on_the_same_values(groups, slots, head_dim, seed):
    """bf16 in and out, float32 inside: the only error left is rounding the output to bf16 (8 bits)."""
    q, k, v, g = problem(2, 4, groups, slots, head_dim, seed, dtype=torch.bfloat16)
    out = cpu_attention.decode_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    expected = definition(q, k, v)
    assert ((out.double() - expected).abs() <= 2**-8 * expected.abs() + 1e-6).all()


def test_peaked_and_flat_scores():
    """Scores spread over hundreds (exp underflows for all but one slot) and all equal (uniform weights)."""
    q, k, v, _ = problem(1, 2, 4, 50, 16, seed=1, scale=300.0)
    assert (cpu_attention.decode_attention(q, k, v) - definition(q, k, v)).abs().max() < 1e-5
    flat = cpu_attention.decode_attention(torch.zeros_like(q), k, v)
    assert torch.allclose(flat, v.mean(dim=2, keepdim=True).repeat_interleave(4, dim=1), atol=1e-6)


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_inputs_give_nan_outputs_like_the_definition(where):
    """A NaN must reach the logits (generate stops with an error there), not vanish in the softmax."""
    q, k, v, _ = problem(1, 2, 3, 20, 16, seed=5)
    {"q": q[0, 1, 0], "k": k[0, 0, 7], "v": v[0, 1, 3]}[where][2] = float("nan")
    got = cpu_attention.decode_attention(q, k, v)
    assert torch.equal(got.isnan(), definition(q, k, v).isnan()) and got.isnan().any()


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 3), slots=st.integers(2, 40), seed=st.integers(0, 2**16), padded=st.booleans())
def test_cpp_backend_equals_eager_through_attention(batch, slots, seed, padded):
    """attention()'s decode call: causal by slot plus left padding, key_mask and query_pos as they come."""
    q, k, v, g = problem(batch, 2, 3, slots, 16, seed)
    key_mask = torch.rand(batch, slots, generator=g) > 0.3 if padded else None
    query_pos = torch.tensor([slots - 2])
    cpp = attention(q, k, v, key_mask=key_mask, query_pos=query_pos, backend="cpp")
    eager = attention(q, k, v, key_mask=key_mask, query_pos=query_pos, backend="eager")
    assert (cpp - eager).abs().max() < 1e-5


def test_cpp_backend_refuses_blocks_of_queries_and_says_which_backends_ran():
    """The kernel computes one query token; a prefill forced onto it is refused, not run elsewhere."""
    q, k, v, _ = problem(2, 2, 2, 9, 16, seed=3)
    q = torch.cat([q] * 9, dim=2)  # (B, Hq, 9, D): a prefill
    pos = torch.arange(9)
    with pytest.raises(ConfigError, match="'cpp' computes one query token per row .* got 9"):
        attention(q, k, v, query_pos=pos, backend="cpp")
    before = backend_counts()
    attention(q, k, v, query_pos=pos)  # the default for 9 queries on the CPU
    attention(q[:, :, :1], k, v, query_pos=pos[:1])  # and for one
    after = backend_counts()
    assert after.get("sdpa", 0) - before.get("sdpa", 0) == 1 and after["cpp"] - before.get("cpp", 0) == 1


def test_one_token_on_the_cpu_defaults_to_the_kernel():
    cpu = torch.device("cpu")
    assert default_backend(cpu, 1) == "cpp" and default_backend(cpu, 7) == "sdpa"
    with use_backend("eager"):
        assert default_backend(cpu, 1) == "eager"


def test_decoding_through_the_kernel_gives_the_eager_tokens_and_logits(tiny_checkpoint):
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    ids = torch.randint(0, 400, (2, 11), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    args = dict(attention_mask=mask, max_new_tokens=12, return_dict_in_generate=True, output_logits=True)
    kernel = model.generate(ids, **args, **GREEDY)
    with use_backend("eager"):
        eager = model.generate(ids, **args, **GREEDY)
    assert torch.equal(kernel.sequences, eager.sequences)
    assert max((a - b).abs().max() for a, b in zip(kernel.logits, eager.logits, strict=True)) < 1e-4


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v, m, s: (q.expand(-1, -1, 2, -1), k, v, m, s), r"q must be \(B, Hq, 1, D\)"),
        (lambda q, k, v, m, s: (q, k, v[:, :, :-1], m, s), "k and v must both be"),
        (lambda q, k, v, m, s: (q[:, :5], k, v, m, s), "5 query heads are not a multiple of 2"),
        (lambda q, k, v, m, s: (q, k.double(), v, m, s), "q, k, v must share one dtype"),
        (lambda q, k, v, m, s: (q.half(), k.half(), v.half(), m, s), "float32 or bfloat16 expected"),
        (lambda q, k, v, m, s: (q, k, v, m.int(), s), "key_mask must be bool"),
        (lambda q, k, v, m, s: (q, k, v, m[:, :-1], s), "key_mask must be bool"),
        (lambda q, k, v, m, s: (q[:, :, :, :8], k, v, m, s), r"k \[2, 2, 10, 16\] does not match q"),
        (lambda q, k, v, m, s: (q, k, v, m, s + 1), "query_slot 10 is outside the 10 cache slots"),
        (lambda q, k, v, m, s: (q, k, v, m, s - 10), "query_slot -1 is outside"),
        (lambda q, k, v, m, s: (q, k, v, m, s.float()), "query_slot must be one int64"),
        (lambda q, k, v, m, s: (q, k, v, m, s.int()), "query_slot must be one int64"),
        (lambda q, k, v, m, s: (q, k, v, m, s.repeat(2)), "query_slot must be one int64"),
    ],
)
def test_operator_refuses_what_it_cannot_compute(change, message):
    q, k, v, _ = problem(2, 2, 3, 10, 16, seed=0)
    args = change(q, k, v, torch.ones(2, 10, dtype=torch.bool), torch.tensor([9]))
    with pytest.raises(ConfigError, match=f"^decode_attention: {message}"):
        cpu_attention.decode_attention(*args)


def test_forced_cpp_backend_without_its_kernel_is_a_config_error():
    q, k, v, _ = problem(1, 1, 2, 5, 8, seed=0)
    with override(cpu_attention=False):
        assert default_backend(torch.device("cpu"), 1) == "eager"
        with pytest.raises(ConfigError, match="backend 'cpp' cannot run"):
            attention(q, k, v, query_pos=torch.tensor([4]), backend="cpp")


CHECK_FALLBACK = """
import logging, torch
logging.basicConfig()
from minaf3.attention import attention, default_backend
q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
out = attention(q, k, v, query_pos=torch.tensor([5]))
print(default_backend(torch.device("cpu"), 1), out.shape[1])
"""


def test_missing_compiler_falls_back_to_the_eager_path_with_a_note(tmp_path):
    done = run_python(CHECK_FALLBACK, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-c++"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["eager", "4"]
    assert "CPU decode attention kernel: building cpu_attention.cpp failed" in done.stderr


def test_unknown_backends_are_config_errors_naming_the_choices():
    q, k, v, _ = problem(1, 1, 2, 5, 8, seed=0)
    with pytest.raises(
        ConfigError, match=r"unknown attention backend 'flash'; choose one of \('triton', 'cpp'"
    ):
        attention(q, k, v, backend="flash")
    with pytest.raises(ConfigError, match="unknown attention backend 'fast'"):
        with use_backend("fast"):
            pass
