"""The `minaf3` command (`python -m minaf3`): chat, transcribe, demo, estimate, batch, eval, finetune, serve,
train.

    minaf3 chat --model DIR --audio FILE "What is in this audio?"   one answer, streamed as it is generated
    minaf3 chat --model DIR --audio FILE                            at a terminal: a multi-turn conversation
    minaf3 transcribe --model DIR FILE... [--format text|json|srt]  any length; JSON: one object per file
    minaf3 demo                                                     a tiny trained model hears clips
    minaf3 estimate --model DIR --seconds 600 --batch 4             memory needed, before loading anything
    minaf3 batch --model DIR --manifest in.jsonl --out out.jsonl    a corpus, resumable; under torchrun too
    minaf3 eval --model DIR --data set.json --out report.json       answers scored, a table per task
    minaf3 finetune --model DIR --data set.json --out ADAPTER       a LoRA adapter (PEFT format), resumable
    minaf3 serve --model DIR [--port 8000]                          an OpenAI-compatible HTTP API
    minaf3 train --out DIR                                          a tiny AF3 from scratch, resumable

Errors minaf3 raises on purpose (a missing file, bad audio, a setting out of range) print as one
`minaf3: error: ...` message with exit status 2, like argparse's own usage errors; anything else is a bug and
keeps its traceback. Answers and transcripts go to stdout; progress bars, warnings and prompts to stderr.
"""

import argparse
import json
import sys
from pathlib import Path

from minaf3 import command
from minaf3.errors import InputError, Minaf3Error

EXIT_DOES_NOT_FIT = 1  # `estimate`: the run would not fit the device


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, metavar="DIR", help="checkpoint folder (nvidia/audio-flamingo-3-hf)"
    )
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="compute dtype")
    p.add_argument(
        "--quantize", default=None, choices=["int8", "int4"], help="weight-only int8 or int4 decoder, lm_head"
    )
    from minaf3.batch import add_adapter_options

    add_adapter_options(p)  # --adapter DIR, --adapter-unmerged


def _add_generation_options(p: argparse.ArgumentParser, default_tokens: int, samples: bool) -> None:
    """--max-new-tokens, --seed and the choice between greedy decoding and the checkpoint's sampling.

    chat samples by default (the checkpoint's settings) and takes --greedy; transcribe is greedy by default
    (a transcript should not change between runs) and takes --sample. Each accepts the other's default too.
    """
    p.add_argument("--max-new-tokens", type=int, default=default_tokens, metavar="N")
    choice = p.add_mutually_exclusive_group()
    choice.add_argument(
        "--greedy",
        dest="sample",
        action="store_false",
        help="greedy decoding" + (" instead of the checkpoint's sampling" if samples else " (the default)"),
    )
    choice.add_argument(
        "--sample",
        dest="sample",
        action="store_true",
        help="the checkpoint's sampling" + (" (the default)" if samples else " instead of greedy decoding"),
    )
    p.set_defaults(sample=samples)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling, for repeatable answers")


def build_parser() -> argparse.ArgumentParser:
    from minaf3.pipeline import DEFAULT_BATCH_SIZE
    from minaf3.sampling import DEFAULT_MAX_NEW_TOKENS

    parser = argparse.ArgumentParser(prog="minaf3", description="Audio Flamingo 3 in plain PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = commands.add_parser("chat", help="ask about audio (multi-turn at a terminal)")
    _add_model_options(chat)
    chat.add_argument("question", nargs="?", help="the question; omit it for a conversation at a terminal")
    chat.add_argument("--audio", action="append", default=[], metavar="FILE", help="audio file (repeatable)")
    chat.add_argument("--think", action="store_true", help="ask AF-Think to reason before answering")
    chat.add_argument(
        "--refuse-long-audio", action="store_true", help="error on audio over 600 s (default: cut)"
    )
    _add_generation_options(chat, DEFAULT_MAX_NEW_TOKENS, samples=True)
    chat.set_defaults(run=run_chat)

    transcribe = commands.add_parser("transcribe", help="transcribe audio files of any length")
    _add_model_options(transcribe)
    transcribe.add_argument("files", nargs="+", metavar="FILE")
    transcribe.add_argument(
        "--format",
        default="text",
        choices=["text", "json", "srt"],
        help="json: one line per file with text and segments [{start, end, text}] in seconds; text and srt: "
        "several files are separated by '==> FILE <==' lines. Segments are the 10-minute pieces long audio "
        "is read in: no word timestamps",
    )
    transcribe.add_argument("--prompt", default=None, help="instead of 'Transcribe the input speech.'")
    transcribe.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N", help="segments per batch"
    )
    transcribe.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _add_generation_options(transcribe, DEFAULT_MAX_NEW_TOKENS, samples=False)
    transcribe.set_defaults(run=run_transcribe)

    demo = commands.add_parser("demo", help="the shipped tiny model answers questions about fresh clips")
    demo.add_argument("--device", default=None, help="cpu (default), cuda or auto")
    demo.add_argument("--seed", type=int, default=0, help="evaluation seed of the clips (0..999)")
    demo.set_defaults(run=run_demo)

    estimate = commands.add_parser("estimate", help="memory a run needs and whether it fits (loads nothing)")
    estimate.add_argument("--model", required=True, metavar="DIR")
    estimate.add_argument("--seconds", type=float, default=600.0, help="audio length per item (default 600)")
    estimate.add_argument("--batch", type=int, default=1, help="items per generate call (default 1)")
    estimate.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    estimate.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    estimate.add_argument("--quantize", default=None, choices=["int8", "int4"])
    estimate.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N")
    estimate.set_defaults(run=run_estimate)

    from minaf3.batch import add_parser as add_batch_parser
    from minaf3.evaluate import add_parser as add_eval_parser
    from minaf3.finetune import add_parser as add_finetune_parser
    from minaf3.serve.server import add_parser as add_serve_parser
    from minaf3.train import add_parser as add_train_parser

    add_batch_parser(commands)
    add_eval_parser(commands)
    add_finetune_parser(commands)
    add_serve_parser(commands)
    add_train_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with `argv` (default sys.argv[1:]); returns the exit status."""
    return command.run(build_parser(), argv)


def _generation_kwargs(args: argparse.Namespace, pipe) -> dict:
    # When sampling, temperature, top_k and top_p come from the checkpoint's generation_config.json.
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample}
    if args.seed is not None:
        import torch

        # Sampling draws on the model's device, so the generator must live there too.
        kwargs["generator"] = torch.Generator(pipe.model.device).manual_seed(args.seed)
    return kwargs


def _load(args: argparse.Namespace, think: bool = False):
    import minaf3
    from minaf3.batch import adapter_options

    return minaf3.load(
        args.model,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        think=think,
        **adapter_options(args),
    )


def run_chat(args: argparse.Namespace) -> int:
    from minaf3.audio import load_audio
    from minaf3.weights.loader import check_model_folder

    interactive = args.question is None and sys.stdin.isatty()
    question = args.question
    if question is None and not interactive:
        question = sys.stdin.read().strip()  # `echo "question" | minaf3 chat ...`
        if not question:
            raise InputError("no question: give one as an argument, on stdin, or run at a terminal to chat")
    args.model = check_model_folder(args.model)  # a hub id is downloaded (or found in the cache) once, here
    clips = [load_audio(path) for path in args.audio]  # before loading the model: a bad path fails fast
    pipe = _load(args, think=args.think)
    kwargs = _generation_kwargs(args, pipe)
    messages: list[dict] = []
    if interactive:
        print(
            "minaf3 chat: type a question; an empty line is skipped, Ctrl-D or 'exit' ends", file=sys.stderr
        )
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
            question = sys.stdin.readline()
            if not question or question.strip() in ("exit", "quit"):  # EOF (Ctrl-D) or a quit command
                print(file=sys.stderr)
                return 0
            question = question.strip()
            if not question:
                continue
            print("af3> ", end="", file=sys.stderr, flush=True)
        content = [{"type": "audio", "audio": clip} for clip in clips] if not messages else []
        messages.append({"role": "user", "content": content + [{"type": "text", "text": question}]})
        pieces = []
        try:
            for piece in pipe.chat(messages, stream=True, refuse_long_audio=args.refuse_long_audio, **kwargs):
                pieces.append(piece)
                print(piece, end="", flush=True)
        except Minaf3Error as error:
            if not interactive:
                raise
            # One bad turn (say, a conversation grown past the context) need not end the session.
            print(f"\nminaf3: error: {error}", file=sys.stderr)
            messages.pop()
            continue
        print()
        if not interactive:
            return 0
        messages.append({"role": "assistant", "content": "".join(pieces)})


def run_transcribe(args: argparse.Namespace) -> int:
    from minaf3.weights.loader import check_model_folder

    args.model = check_model_folder(args.model)
    for path in args.files:  # name the first missing file before spending time on the model
        if not Path(path).is_file():
            raise InputError(f"{path}: no such audio file")
    pipe = _load(args)
    progress = None if not args.no_progress else False  # None: a bar when there is more than one segment
    results = pipe.transcribe(
        list(args.files),
        prompt=args.prompt,
        batch_size=args.batch_size,
        progress=progress,
        **_generation_kwargs(args, pipe),
    )
    several = len(args.files) > 1
    for i, (path, result) in enumerate(zip(args.files, results, strict=True)):
        if args.format == "json":
            print(json.dumps({"file": path, **result.to_dict()}, ensure_ascii=False))
            continue
        if several:  # `head`-style headers keep several files apart in text and SRT output
            print(("\n" if i else "") + f"==> {path} <==")
        if args.format == "text":
            print(result.text)
        else:
            print(result.to_srt(), end="")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from minaf3.demo import run_demo as demo

    demo(seed=args.seed, device=args.device)
    return 0


def run_estimate(args: argparse.Namespace) -> int:
    from minaf3.estimate import estimate_memory, format_estimate

    estimate = estimate_memory(
        args.model,
        seconds=args.seconds,
        batch=args.batch,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        max_new_tokens=args.max_new_tokens,
    )
    print(format_estimate(estimate, args.model))
    return EXIT_DOES_NOT_FIT if estimate.fits is False else 0
