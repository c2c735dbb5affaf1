"""Memory estimates before loading (estimate.py), checked against what loading and generate allocate."""

import pytest
import torch

import minaf3
from minaf3.errors import CheckpointError, ConfigError
from minaf3.estimate import PROMPT_OVERHEAD_TOKENS, estimate_memory, format_estimate
from minaf3.windows import audio_token_count


def allocated_bytes(module: torch.nn.Module) -> int:
    """Bytes of every distinct tensor storage the module holds (parameters and buffers)."""
    storages = {}
    for t in [*module.parameters(), *module.buffers()]:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_equal_what_loading_allocates(demo_checkpoint, dtype):
    estimate = estimate_memory(demo_checkpoint, seconds=30, dtype=dtype)
    model = minaf3.load(demo_checkpoint, dtype=dtype).model
    assert estimate.weights == pytest.approx(allocated_bytes(model), rel=0.05)
    assert estimate.parameters == sum(p.numel() for p in model.parameters())


def test_kv_cache_equals_what_generate_allocates(demo_pipeline, demo_checkpoint):
    estimate = estimate_memory(demo_checkpoint, seconds=75, batch=3, max_new_tokens=40)
    assert estimate.prompt_tokens == audio_token_count(75 * 16000) + PROMPT_OVERHEAD_TOKENS
    decoder = demo_pipeline.model.language_model
    decoder.setup_cache(3, estimate.prompt_tokens + 40, demo_pipeline.model.dtype, "cpu")
    try:
        cache = sum(b.nbytes for layer in decoder.layers for b in layer.self_attn.kv_cache.buffers())
    finally:
        decoder.clear_cache()
    assert estimate.kv_cache == cache


def test_long_audio_is_estimated_per_600_s_segment(demo_checkpoint):
    hour = estimate_memory(demo_checkpoint, seconds=3600, batch=2)
    ten_minutes = estimate_memory(demo_checkpoint, seconds=600, batch=2)
    assert (hour.kv_cache, hour.activations) == (ten_minutes.kv_cache, ten_minutes.activations)
    assert "segments of at most 600 s" in format_estimate(hour, "m")


def test_grows_with_batch_and_length(demo_checkpoint):
    small = estimate_memory(demo_checkpoint, seconds=30, batch=1)
    assert estimate_memory(demo_checkpoint, seconds=300, batch=1).kv_cache > small.kv_cache
    big = estimate_memory(demo_checkpoint, seconds=30, batch=4)
    assert big.kv_cache == 4 * small.kv_cache and big.activations > small.activations
    assert big.weights == small.weights


def test_int8_shrinks_the_decoder_matrices(demo_checkpoint):
    fp32 = estimate_memory(demo_checkpoint, seconds=30)
    int8 = estimate_memory(demo_checkpoint, seconds=30, quantize="int8")
    model = minaf3.load(demo_checkpoint).model
    quantized = [model.lm_head.weight] + [
        m.weight
        for layer in model.language_model.layers
        for m in layer.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    saved = sum(w.numel() * 3 - w.shape[0] * 4 for w in quantized)  # 4 -> 1 byte, plus a scale per row
    assert fp32.weights - int8.weights == saved


def test_fits_against_available_memory(demo_checkpoint):
    estimate = estimate_memory(demo_checkpoint, seconds=30)
    assert estimate.available is not None and estimate.available > 0
    assert estimate.fits and "fits: yes" in format_estimate(estimate, "demo")
    huge = estimate_memory(demo_checkpoint, seconds=600, batch=4096)
    assert huge.fits is False and "fits: no" in format_estimate(huge, "demo")


def test_cuda_without_a_gpu_is_unknown(demo_checkpoint):
    if torch.cuda.is_available():
        estimate = estimate_memory(demo_checkpoint, seconds=30, device="cuda")
        assert estimate.available == torch.cuda.mem_get_info()[0]
    else:
        estimate = estimate_memory(demo_checkpoint, seconds=30, device="cuda")
        assert estimate.fits is None and "unknown" in format_estimate(estimate, "demo")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seconds": -1}, "seconds=-1"),
        ({"seconds": float("nan")}, "seconds=nan"),
        ({"batch": 0}, "batch=0"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"device": "tpu"}, "device='tpu'"),
        ({"quantize": "int3"}, "quantize='int3'"),
        ({"dtype": "int8"}, "dtype='int8'"),
    ],
)
def test_bad_arguments(demo_checkpoint, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        estimate_memory(demo_checkpoint, **{"seconds": 30, **kwargs})


def test_missing_model(tmp_path):
    with pytest.raises(CheckpointError, match="huggingface-cli download"):
        estimate_memory(tmp_path / "nowhere", seconds=30)


def test_loading_weights_that_cannot_fit_is_a_config_error(tiny_checkpoint, monkeypatch):
    """float32 -> bfloat16 makes new tensors: with too little memory, a ConfigError before any tensor is read,
    not the OOM killer halfway through."""
    from minaf3 import estimate

    monkeypatch.setattr(estimate, "available_memory", lambda device: (1000, "available RAM"))
    model_cls = minaf3.AudioFlamingo3ForConditionalGeneration
    with pytest.raises(ConfigError, match=r"weights need 0\.0 GB in bfloat16 but available RAM is 0\.0 GB"):
        model_cls.from_pretrained(tiny_checkpoint, dtype="bfloat16")
    with pytest.raises(ConfigError, match=r"in float32 with quantize='int8' but available RAM"):
        model_cls.from_pretrained(tiny_checkpoint, quantize="int8")
    model = model_cls.from_pretrained(tiny_checkpoint)  # float32 as stored: views of the file, no new memory
    assert model.dtype == torch.float32


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_automatic_float32_that_cannot_fit_keeps_the_stored_bf16(
    bf16_checkpoint, monkeypatch, caplog, quantize
):
    """On a CPU without bf16 instructions minaf3 picks float32 for a bf16 checkpoint; where that cannot fit
    (the 7B model on 24 GB) it loads bf16 as stored, saying so; a dtype asked for is never changed."""
    from minaf3 import dtypes, estimate

    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: False)
    cpu = torch.device("cpu")
    bf16 = estimate.weight_bytes(bf16_checkpoint, torch.bfloat16, quantize)[1]
    fp32 = estimate.weight_bytes(bf16_checkpoint, torch.float32, quantize)[1]
    monkeypatch.setattr(estimate, "available_memory", lambda device: ((bf16 + fp32) // 2, "available RAM"))
    model_cls = minaf3.AudioFlamingo3ForConditionalGeneration
    with caplog.at_level("WARNING", logger="minaf3.estimate"):
        model = model_cls.from_pretrained(bf16_checkpoint, quantize=quantize)
    assert model.dtype == torch.bfloat16
    assert "in float32 but available RAM is" in caplog.text and "loading them in bfloat16" in caplog.text
    with pytest.raises(ConfigError, match="in float32"):
        model_cls.from_pretrained(bf16_checkpoint, dtype="float32", quantize=quantize)
    assert (
        estimate.weights_dtype(bf16_checkpoint, torch.float32, cpu, quantize, automatic=True)
        == torch.bfloat16
    )
    # `minaf3 estimate` reports the dtype the load would pick, and a float32 asked for as not fitting
    assert estimate.estimate_memory(bf16_checkpoint, 5, quantize=quantize).dtype == torch.bfloat16
    assert estimate.estimate_memory(bf16_checkpoint, 5, dtype="float32", quantize=quantize).fits is False
