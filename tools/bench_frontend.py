"""Benchmark: 10 minutes of audio to log-mel features, minaf3 against transformers' WhisperFeatureExtractor.

    python tools/bench_frontend.py [--seconds 600] [--repeats 7] [--threads N] [--device cpu]

All front ends get the same 16 kHz waveform and return (n_windows, 128, 3000) features and masks:
- transformers, default: WhisperFeatureExtractor(feature_size=128) called on the AF3 processor's 30 s chunks,
  which runs its torch path (`_torch_extract_fbank_features`) whenever torch is installed;
- transformers, numpy path: the same call with `_np_extract_fbank_features`;
- minaf3: `log_mel_spectrogram(audio)`, its default (on CPU the C++ kernel of kernels/log_mel.cpp), and on
  CPU also with backend="torch", the plain torch path it falls back to where the kernel cannot be built.
Rounds are interleaved so that load from other processes hits every method alike; the table reports the
best round (the least disturbed) and the median. Prints the markdown table the README shows.
"""

import argparse
import statistics
import time

import numpy as np
import torch

from minaf3.features import log_mel_spectrogram
from minaf3.windows import SAMPLING_RATE, window_bounds


def speech_like(num_samples: int, seed: int = 0) -> np.ndarray:
    """Harmonics of a gliding 120 Hz pitch under a 4 Hz syllable envelope, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / SAMPLING_RATE
    phase = 2 * np.pi * np.cumsum(120 + 30 * np.sin(np.pi * t)) / SAMPLING_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2
    return (0.2 * voiced * envelope + 0.01 * rng.standard_normal(num_samples)).astype(np.float32)


def transformers_front_ends():
    """The reference extractor twice: as shipped (torch path) and forced onto its numpy path."""
    from transformers import WhisperFeatureExtractor
    from transformers.utils import logging

    logging.set_verbosity_error()
    default = WhisperFeatureExtractor(feature_size=128, return_attention_mask=True)
    numpy_path = WhisperFeatureExtractor(feature_size=128, return_attention_mask=True)
    # __call__ looks the extraction function up on the instance: point it at the numpy implementation.
    numpy_path._torch_extract_fbank_features = numpy_path._np_extract_fbank_features

    def run(extractor):
        def extract(audio: np.ndarray):
            # The AF3 processor's chunking: 30 s windows, at most 20, the last one short.
            chunks = [audio[start:end] for start, end in window_bounds(len(audio))]
            out = extractor(
                chunks, sampling_rate=SAMPLING_RATE, return_attention_mask=True, return_tensors="pt"
            )
            return out["input_features"], out["attention_mask"]

        return extract

    return run(default), run(numpy_path)


def bench(methods: dict, audio: np.ndarray, repeats: int) -> dict[str, list[float]]:
    times = {name: [] for name in methods}
    for fn in methods.values():  # warm-up: first-call allocations, filter-bank caches
        fn(audio)
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn(audio)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="audio length (default: 10 minutes)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="device for minaf3 (the reference runs on CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    audio = speech_like(int(args.seconds * SAMPLING_RATE))
    reference_torch, reference_numpy = transformers_front_ends()

    def minaf3_front_end(backend: str | None):
        def extract(x):
            features, mask = log_mel_spectrogram(x, device=args.device, backend=backend)
            if features.is_cuda:
                torch.cuda.synchronize()
            return features, mask

        return extract

    methods = {
        "transformers WhisperFeatureExtractor (default, torch path)": reference_torch,
        "transformers WhisperFeatureExtractor (numpy path)": reference_numpy,
    }
    if args.device == "cpu":
        methods["minaf3 log_mel_spectrogram (cpu, default: C++ kernel)"] = minaf3_front_end(None)
        methods['minaf3 log_mel_spectrogram (cpu, backend="torch")'] = minaf3_front_end("torch")
    else:
        methods[f"minaf3 log_mel_spectrogram ({args.device})"] = minaf3_front_end(None)

    theirs, their_mask = reference_torch(audio)
    checks = []
    for name, fn in list(methods.items())[2:]:
        ours, mask = fn(audio)
        error = (ours.cpu() - theirs).abs().max().item()
        masks_equal = torch.equal(mask.cpu(), their_mask.to(torch.int32))
        checks.append(f"{name} vs transformers: max abs difference {error:.2e}, masks equal: {masks_equal}")

    times = bench(methods, audio, args.repeats)
    baseline = times[next(iter(methods))]
    print(
        f"{args.seconds:g} s of audio -> {tuple(theirs.shape)} features; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; best and median of {args.repeats} interleaved rounds"
    )
    print("\n".join(checks) + "\n")
    print("| front end | best | median | speed-up vs transformers default (best / median) |")
    print("| --- | ---: | ---: | ---: |")
    for name, samples in times.items():
        best, median = min(samples), statistics.median(samples)
        speedup = f"{min(baseline) / best:.1f}x / {statistics.median(baseline) / median:.1f}x"
        print(f"| {name} | {best * 1e3:.0f} ms | {median * 1e3:.0f} ms | {speedup} |")


if __name__ == "__main__":
    main()
