"""Triton kernels against their torch references and torch's scaled_dot_product_attention.

Without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton, so the kernels run
in Triton's numpy interpreter on the CPU: small shapes, float32 (tolerance 1e-4) and float16. Small tiles
(16, 32) make small inputs cross several block edges. With CUDA the same tests run the compiled kernels,
and the requires_cuda tests add bfloat16, official sizes and CUDA-graph capture of the decode step.

The references are themselves checked against independent definitions: sdpa with an explicit boolean
mask built here from the visibility rule, and transformers' Qwen2RMSNorm and apply_rotary_pos_emb.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from minaf3.kernels import triton_common as kernels
from minaf3.kernels.decode_attention import decode_attention, decode_attention_reference
from minaf3.kernels.encoder_attention import encoder_attention, encoder_attention_reference
from minaf3.kernels.prefill_attention import prefill_attention, prefill_attention_reference
from minaf3.kernels.rmsnorm_rope import (
    add_rms_norm,
    add_rms_norm_reference,
    apply_rotary,
    apply_rotary_reference,
    rms_norm,
    rms_norm_reference,
)

from minaf3.errors import ConfigError

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # atol = rtol per dtype
FLOATS = st.sampled_from([torch.float32, torch.float16])
KERNEL_SETTINGS = settings(max_examples=15, deadline=None)


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


def qkv(batch, q_heads, kv_heads, t, s, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(batch, h, n, dim, generator=g) for h, n in ((q_heads, t), (kv_heads, s), (kv_heads, s))
    )
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype)


def sdpa(q, k, v, visible):
    """The definition in torch: visible (B or 1, 1, T, S) bool, True = may attend; GQA by repeating k/v."""
    groups = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(groups, dim=1).float() for x in (k, v))  # (B, Hkv, S, D) -> (B, Hq, S, D)
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=visible)


def causal_visibility(key_mask, query_pos, num_keys):
    """(B, 1, T, S): query i sees slot j iff j <= query_pos[i] and (key_mask[b, j] or j == query_pos[i])."""
    slots = torch.arange(num_keys, device=DEVICE)
    own = slots[None, :] == query_pos[:, None]  # (T, S)
    return ((slots[None, :] <= query_pos[:, None]) & (key_mask[:, None, :] | own))[:, None]


def test_kernels_can_run_here():
    assert kernels.is_available(DEVICE), (
        "set TRITON_INTERPRET=1 before triton is imported (tests/conftest.py)"
    )


@KERNEL_SETTINGS
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 2),
    groups=st.integers(1, 3),
    t=st.integers(1, 40),
    s=st.integers(1, 40),
    dim=st.sampled_from([16, 64]),
    padding=st.sampled_from(["none", "mask", "lengths"]),
    block=st.sampled_from([16, 32]),
    dtype=FLOATS,
    seed=st.integers(0, 2**16),
)
def test_encoder_attention(batch, kv_heads, groups, t, s, dim, padding, block, dtype, seed):
    q, k, v = qkv(batch, kv_heads * groups, kv_heads, t, s, dim, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(1, s + 1, (batch,), generator=g).to(DEVICE)
    key_mask = (torch.rand(batch, s, generator=g) < 0.6).to(DEVICE)
    key_mask[:, 0] = True  # every row keeps a key: the reference's zeros for empty rows are tested below
    pad = {"none": {}, "mask": {"key_mask": key_mask}, "lengths": {"valid_len": lengths}}[padding]
    visible = {"none": torch.ones_like(key_mask), "mask": key_mask}.get(padding)
    if visible is None:
        visible = torch.arange(s, device=DEVICE)[None, :] < lengths[:, None]

    out = encoder_attention(q, k, v, block_m=block, block_n=block, **pad)
    assert out.shape == q.shape and out.dtype == dtype
    close(out, encoder_attention_reference(q, k, v, **pad), dtype)
    close(out, sdpa(q, k, v, visible[:, None, None, :]), dtype)


def test_encoder_attention_row_without_keys_is_zero():
    q, k, v = qkv(2, 2, 2, 5, 20, 16, torch.float32, 0)
    out = encoder_attention(q, k, v, valid_len=torch.tensor([0, 20], device=DEVICE), block_m=16, block_n=16)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and out[1].abs().sum() > 0
    mask = torch.zeros(2, 20, dtype=torch.bool, device=DEVICE)
    close(encoder_attention(q, k, v, key_mask=mask), torch.zeros_like(q))
    close(encoder_attention_reference(q, k, v, key_mask=mask), sdpa(q, k, v, mask[:, None, None, :]))


@KERNEL_SETTINGS
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 2),
    groups=st.sampled_from([1, 2, 7]),
    t=st.integers(1, 24),
    extra=st.integers(0, 24),
    dim=st.sampled_from([16, 128]),
    slots=st.sampled_from(["chunk", "scattered"]),
    masking=st.sampled_from(["left", "random", "none"]),
    transposed=st.booleans(),
    dtype=FLOATS,
    seed=st.integers(0, 2**16),
)
def test_prefill_attention(batch, kv_heads, groups, t, extra, dim, slots, masking, transposed, dtype, seed):
    s = t + extra
    q, k, v = qkv(batch, kv_heads * groups, kv_heads, t, s, dim, dtype, seed)
    if transposed:  # the decoder's (B, T, H, D) projection seen as (B, H, T, D)
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    g = torch.Generator().manual_seed(seed + 1)
    if slots == "chunk":  # a prompt, or a chunk appended after `start` cached tokens
        start = int(torch.randint(0, extra + 1, (), generator=g))
        query_pos = torch.arange(start, start + t)
    else:
        query_pos = torch.randperm(s, generator=g)[:t].sort().values
    query_pos = query_pos.to(DEVICE)
    # left padding may cover some query slots: those rows see only their own slot
    pads = torch.randint(0, s + 1, (batch,), generator=g)
    key_mask = {
        "left": torch.arange(s)[None, :] >= pads[:, None],
        "random": torch.rand(batch, s, generator=g) < 0.5,
        "none": torch.ones(batch, s, dtype=torch.bool),
    }[masking].to(DEVICE)
    mask_arg = None if masking == "none" else key_mask

    out = prefill_attention(q, k, v, query_pos=query_pos, key_mask=mask_arg, block_m=16, block_n=16)
    assert out.shape == q.shape and not out.isnan().any()
    close(out, prefill_attention_reference(q, k, v, query_pos=query_pos, key_mask=mask_arg), dtype)
    close(out, sdpa(q, k, v, causal_visibility(key_mask, query_pos, s)), dtype)
    # without the own-slot rule a query that sees nothing outputs zeros, exactly like sdpa
    loose = prefill_attention(q, k, v, query_pos=query_pos, key_mask=mask_arg, own_slot=False, block_n=32)
    strict = torch.arange(s, device=DEVICE)[None, :] <= query_pos[:, None]  # (T, S)
    close(loose, sdpa(q, k, v, (strict & key_mask[:, None, :])[:, None]), dtype)


@KERNEL_SETTINGS
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 2),
    groups=st.sampled_from([1, 2, 4, 7]),
    s=st.integers(1, 150),
    dim=st.sampled_from([16, 128]),
    causal=st.booleans(),
    num_splits=st.integers(1, 8),
    block_n=st.sampled_from([16, 32]),
    dtype=FLOATS,
    seed=st.integers(0, 2**16),
)
def test_decode_attention(batch, kv_heads, groups, s, dim, causal, num_splits, block_n, dtype, seed):
    q, k, v = qkv(batch, kv_heads * groups, kv_heads, 1, s, dim, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    slot = int(torch.randint(0, s, (), generator=g))
    query_pos = torch.tensor([slot], device=DEVICE) if causal else None
    pads = torch.randint(0, slot + 1, (batch,), generator=g)  # a row may be padding up to the new slot
    key_mask = (torch.arange(s)[None, :] >= pads[:, None]).to(DEVICE)
    if not causal:
        key_mask[:, -1] = True  # bidirectional rows need one key to be defined

    out = decode_attention(
        q, k, v, query_pos=query_pos, key_mask=key_mask, num_splits=num_splits, block_n=block_n
    )
    assert out.shape == q.shape and not out.isnan().any()
    close(out, decode_attention_reference(q, k, v, query_pos=query_pos, key_mask=key_mask), dtype)
    if causal:
        visible = causal_visibility(key_mask, query_pos, s)
    else:
        visible = key_mask[:, None, None, :]
    close(out, sdpa(q, k, v, visible), dtype)


def test_decode_attention_is_prefill_of_one_token():
    """The same step through both kernels, with default tiles and splits, on a left-padded batch."""
    q, k, v = qkv(2, 8, 2, 1, 70, 128, torch.float32, 3)
    key_mask = (torch.arange(70)[None, :] >= torch.tensor([[0], [40]])).to(DEVICE)
    query_pos = torch.tensor([45], device=DEVICE)
    close(
        decode_attention(q, k, v, query_pos=query_pos, key_mask=key_mask),
        prefill_attention(q, k, v, query_pos=query_pos, key_mask=key_mask),
    )
    # a row padded up to the new slot sees nothing without the own-slot rule: zeros, not NaN
    key_mask[1, :46] = False
    out = decode_attention(q, k, v, query_pos=query_pos, key_mask=key_mask, own_slot=False, num_splits=3)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    close(out, decode_attention_reference(q, k, v, query_pos=query_pos, key_mask=key_mask, own_slot=False))


@settings(max_examples=20, deadline=None)
@given(
    shape=st.sampled_from([(1, 1), (3,), (2, 5)]),
    hidden=st.integers(1, 300),
    eps=st.sampled_from([1e-6, 1e-5]),
    residual=st.booleans(),
    dtype=FLOATS,
    seed=st.integers(0, 2**16),
)
def test_rms_norm(shape, hidden, eps, residual, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x, r = (torch.randn(*shape, hidden, generator=g).to(DEVICE, dtype) for _ in range(2))
    weight = torch.randn(hidden, generator=g).to(DEVICE, dtype)
    if residual:
        y, h = add_rms_norm(x, r, weight, eps)
        y_ref, h_ref = add_rms_norm_reference(x, r, weight, eps)
        assert torch.equal(h, h_ref)  # the add is one rounding in both
    else:
        y, y_ref = rms_norm(x, weight, eps), rms_norm_reference(x, weight, eps)
    assert y.shape == x.shape and y.dtype == dtype
    close(y, y_ref, dtype)


def test_rms_norm_reference_is_qwen2():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    norm = Qwen2RMSNorm(96, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 7, 96)
    torch.testing.assert_close(
        rms_norm_reference(x, norm.weight.detach(), 1e-6), norm(x).detach(), atol=0, rtol=0
    )


def rotary_angles(batch, t, dim, theta, dtype, seed):
    """cos, sin (B, T, D) as Qwen2RotaryEmbedding computes them for random positions."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 4096, (batch, t), generator=g)
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    freqs = positions[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 2),
    q_heads=st.integers(1, 7),
    k_heads=st.integers(1, 3),
    t=st.integers(1, 6),
    dim=st.sampled_from([2, 12, 64, 128]),
    shared=st.booleans(),
    transposed=st.booleans(),
    dtype=FLOATS,
    seed=st.integers(0, 2**16),
)
def test_apply_rotary(batch, q_heads, k_heads, t, dim, shared, transposed, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, t, dim, generator=g).to(DEVICE, dtype)
    k = torch.randn(batch, k_heads, t, dim, generator=g).to(DEVICE, dtype)
    if transposed:  # (B, T, H, D) projections seen as (B, H, T, D)
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    cos, sin = rotary_angles(1 if shared else batch, t, dim, 1e6, dtype, seed)
    if shared:
        cos, sin = cos[0], sin[0]  # (T, D): one set of positions for every row
    q_out, k_out = apply_rotary(q, k, cos, sin)
    q_ref, k_ref = apply_rotary_reference(q, k, cos, sin)
    assert q_out.stride() == q.stride() and k_out.shape == k.shape
    close(q_out, q_ref, dtype)
    close(k_out, k_ref, dtype)


def test_apply_rotary_reference_is_transformers():
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    q, k = torch.randn(2, 4, 5, 64), torch.randn(2, 2, 5, 64)
    cos, sin = (c.cpu() for c in rotary_angles(2, 5, 64, 1e6, torch.float32, 0))
    for ours, theirs in zip(
        apply_rotary_reference(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin), strict=True
    ):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def bad_calls():
    """(name, call) pairs: each call must raise ConfigError before launching anything."""
    q, k, v = qkv(1, 4, 2, 3, 8, 16, torch.float32, 0)
    pos = torch.arange(3, device=DEVICE)
    mask = torch.ones(1, 8, dtype=torch.bool, device=DEVICE)
    x, w = torch.randn(2, 32, device=DEVICE), torch.ones(32, device=DEVICE)
    cos = torch.ones(3, 16, device=DEVICE)
    return [
        ("k head dim", lambda: encoder_attention(q, k[..., :8], v)),
        ("heads not grouped", lambda: encoder_attention(q[:, :3], k, v)),
        ("head dim not 2^n", lambda: encoder_attention(*(t[..., :12] for t in (q, k, v)))),
        ("dtype mix", lambda: encoder_attention(q, k.half(), v)),
        ("mask dtype", lambda: encoder_attention(q, k, v, key_mask=mask.long())),
        ("mask and lengths", lambda: encoder_attention(q, k, v, key_mask=mask, valid_len=pos[:1])),
        ("lengths shape", lambda: encoder_attention(q, k, v, valid_len=pos)),
        ("no query_pos", lambda: prefill_attention(q, k, v, query_pos=None)),
        ("query_pos length", lambda: prefill_attention(q, k, v, query_pos=pos[:2])),
        ("mask shape", lambda: prefill_attention(q, k, v, query_pos=pos, key_mask=mask[:, :5])),
        ("tile size", lambda: prefill_attention(q, k, v, query_pos=pos, block_n=8)),
        ("two tokens", lambda: decode_attention(q[:, :, :2], k, v)),
        ("splits", lambda: decode_attention(q[:, :, :1], k, v, num_splits=0)),
        ("too many splits", lambda: decode_attention(q[:, :, :1], k, v, num_splits=65)),
        ("weight shape", lambda: rms_norm(x, w[:16], 1e-6)),
        ("weight dtype", lambda: rms_norm(x, w.double(), 1e-6)),
        ("residual shape", lambda: add_rms_norm(x, x[:1], w, 1e-6)),
        ("odd dim", lambda: apply_rotary(q[..., :15], k[:, :, :3, :15], cos[:, :15], cos[:, :15])),
        ("cos shape", lambda: apply_rotary(q, k[:, :, :3], cos[:2], cos[:2])),
    ]


@pytest.mark.parametrize("index", range(len(bad_calls())), ids=[name for name, _ in bad_calls()])
def test_bad_arguments_raise_config_error(index):
    with pytest.raises(ConfigError):
        bad_calls()[index][1]()


def test_refuses_device_without_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", False)
    q, k, v = (torch.randn(1, 2, 4, 16) for _ in range(3))  # CPU tensors
    with pytest.raises(ConfigError, match="cannot run on cpu"):
        encoder_attention(q, k, v)
    with pytest.raises(ConfigError, match="cannot run on cpu"):
        rms_norm(q, torch.ones(16), 1e-6)


@pytest.mark.skipif(not kernels.INTERPRET, reason="only the interpreter mis-computes bf16 tl.dot")
def test_interpreter_refuses_bfloat16_attention():
    q, k, v = qkv(1, 2, 2, 4, 4, 16, torch.bfloat16, 0)
    with pytest.raises(ConfigError, match="interpreter"):
        encoder_attention(q, k, v)


def requires_cuda(test):
    """Extra checks the interpreter cannot make: bf16 on tensor cores, official sizes, CUDA-graph capture."""
    no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.requires_cuda(no_gpu(test))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_official_sizes_with_default_tiles(dtype):
    # encoder: 3 windows x 20 heads x 1500 frames x 64: a full window, 5 s of audio, a single frame
    q, k, v = qkv(3, 20, 20, 1500, 1500, 64, dtype, 0)
    lengths = torch.tensor([1500, 250, 1], device=DEVICE)
    out = encoder_attention(q, k, v, valid_len=lengths)
    close(out, encoder_attention_reference(q, k, v, valid_len=lengths), dtype)
    key_mask = torch.arange(1500, device=DEVICE)[None, :] < lengths[:, None]
    close(encoder_attention(q, k, v, key_mask=key_mask), out, dtype)

    # prefill: Qwen2's 28 query heads over 4 key/value heads of 128; 300 tokens, one row left-padded by 120
    q, k, v = qkv(2, 28, 4, 300, 512, 128, dtype, 1)
    key_mask = (torch.arange(512)[None, :] >= torch.tensor([[0], [120]])).to(DEVICE)
    for start in (0, 200):  # the prompt, then a chunk appended after 200 cached tokens
        query_pos = torch.arange(start, start + 300, device=DEVICE)
        out = prefill_attention(q, k, v, query_pos=query_pos, key_mask=key_mask)
        close(out, prefill_attention_reference(q, k, v, query_pos=query_pos, key_mask=key_mask), dtype)

    # decode: the token at slot 5000 of an 8192-slot cache, default number of splits
    q, k, v = qkv(2, 28, 4, 1, 8192, 128, dtype, 2)
    key_mask = (torch.arange(8192)[None, :] >= torch.tensor([[0], [3000]])).to(DEVICE)
    query_pos = torch.tensor([5000], device=DEVICE)
    out = decode_attention(q, k, v, query_pos=query_pos, key_mask=key_mask)
    close(out, decode_attention_reference(q, k, v, query_pos=query_pos, key_mask=key_mask), dtype)

    # RMSNorm over 3584 and rotary on 28 + 4 heads of 128
    x, r = (torch.randn(2, 7, 3584, device=DEVICE, dtype=dtype) for _ in range(2))
    w = torch.randn(3584, device=DEVICE, dtype=dtype)
    for got, want in zip(add_rms_norm(x, r, w, 1e-6), add_rms_norm_reference(x, r, w, 1e-6), strict=True):
        close(got, want, dtype)
    q, k = (
        torch.randn(2, 28, 7, 128, device=DEVICE, dtype=dtype),
        torch.randn(2, 4, 7, 128, device=DEVICE, dtype=dtype),
    )
    cos, sin = rotary_angles(2, 7, 128, 1e6, dtype, 3)
    for got, want in zip(apply_rotary(q, k, cos, sin), apply_rotary_reference(q, k, cos, sin), strict=True):
        close(got, want, dtype)


@requires_cuda
def test_decode_step_replays_in_a_cuda_graph():
    """Capture fails on any host synchronisation; replay must follow query_pos and the cache in place."""
    q, k, v = qkv(2, 28, 4, 1, 1024, 128, torch.bfloat16, 4)
    key_mask = (torch.arange(1024)[None, :] >= torch.tensor([[0], [50]])).to(DEVICE)
    query_pos = torch.tensor([100], device=DEVICE)
    decode_attention(q, k, v, query_pos=query_pos, key_mask=key_mask)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, query_pos=query_pos, key_mask=key_mask)
    for slot in (100, 700, 1023):
        query_pos.fill_(slot)
        q.normal_()
        k[:, :, slot].normal_()
        graph.replay()
        expected = decode_attention_reference(q, k, v, query_pos=query_pos, key_mask=key_mask)
        close(out, expected, torch.bfloat16)
