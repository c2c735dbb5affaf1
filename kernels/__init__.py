"""Hand-written kernels, each beside the pure-torch reference it must match.

Triton (CUDA; tested on the CPU under TRITON_INTERPRET=1), sharing triton_common.py:
    encoder_attention.py  bidirectional flash attention with a key-padding mask (Whisper encoder)
    prefill_attention.py  causal attention by cache slot, left padding, GQA (Qwen2 prefill)
    decode_attention.py   one query token over the static GQA cache, split along the sequence
    rmsnorm_rope.py       fused residual add + RMSNorm, and rotary embedding (rotate-half)

C++ for the CPU, built on first use with ninja (cpp_build.py):
    log_mel.cpp / .py     Whisper's log-mel front end, every step of a frame fused (minaf3/features.py)
    int8_gemv.cpp         streaming matrix-vector products over int8, bf16 or float32 weights (gemv.py
                          builds it; int8_linear.py and minaf3/quantize.py for int8, minaf3/linear.py for
                          bf16 and float32 decode)
    cpu_attention.cpp/.py one-token decode attention over the GQA cache (minaf3/attention.py's "cpp")
    gemm.cpp / .py        matrix products for many rows (prefill, encoder) on AVX2 CPUs, in float32
                          arithmetic on float32, bf16, int8 or int4 weights (minaf3/linear.py, int8_linear.py,
                          int4_linear.py)
    int4_gemv.cpp / .py   streaming matrix-vector products over int4 weights: AVX-512 BF16 dot products,
                          or AVX-512 / AVX2 float32 code (int4_linear.py, the layout's home)
    bf16_tiles.cpp / .py  int8 and int4 prefill on CPUs with AVX-512 BF16: weight tiles dequantized to bf16,
                          multiplied by torch's bf16 product (int8_linear.py, int4_linear.py)

Importing this package imports nothing heavy: each kernel module brings in what it needs.
"""
