"""`minaf3 serve`: the OpenAI-compatible server on uvicorn, its options, and a clean SIGTERM.

    minaf3 serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch-size 32]
                 [--quantize int8] [--device cpu] [--dtype float32] [--adapter DIR] ...

The model folder is checked before the server starts (a missing or incomplete folder is one error line, as
elsewhere in minaf3; hub ids are not downloaded here). The server then listens at once and loads the model
in a thread (app.py). SIGTERM or Ctrl-C: new requests get 503 and new connections are refused, the requests
in flight run to their end (queued ones included), then the process ends (uvicorn re-raises the signal it
caught, so the exit status still says SIGTERM; Ctrl-C ends with status 130, as elsewhere in minaf3).

--adapter DIR applies a LoRA adapter folder (PEFT format, e.g. the checkpoint's think/) through the model's
load_adapter, merged into the weights. With --quantize only the checkpoint's own think/ can be used (it is
merged before the weights are quantized, as `minaf3.load(think=True)` does).
"""

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from minaf3.errors import CheckpointError, ConfigError, Minaf3Error

logger = logging.getLogger("minaf3.serve")
SERVE_EXTRA = "pip install 'minaf3[serve]'"
# The batcher's thread runs generate's decode loop: thousands of short torch calls, each releasing the GIL
# and taking it back. When the event loop (HTTP, streamed chunks) holds it meanwhile, Python's default
# switch interval (5 ms) can keep the loop waiting 5 ms per step; at 0.5 ms a batch of 20 rows generated
# 1.2-1.6x slower beside a thread busy a third of the time, against 1.7-2.2x at 5 ms (on 2 cores).
GIL_SWITCH_SECONDS = 0.0005


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on the `minaf3` command's subparsers (imports nothing of the server stack)."""
    from minaf3.pipeline import DEFAULT_MAX_NEW_TOKENS

    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP API (and a page at /) for one model")
    p.add_argument(
        "--model",
        required=True,
        metavar="DIR|ID",
        help="checkpoint folder (a hub id must be downloaded first)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="default 8000; 0: any free port")
    p.add_argument(
        "--api-key",
        default=os.environ.get("MINAF3_API_KEY"),
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1 (default: $MINAF3_API_KEY, else no key)",
    )
    p.add_argument(
        "--max-batch-size", type=int, default=32, metavar="N", help="rows per generate call (default 32)"
    )
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=10.0,
        metavar="MS",
        help="how long an idle server waits for more requests to batch with the first (default 10)",
    )
    p.add_argument(
        "--max-padding",
        type=float,
        default=0.25,
        metavar="F",
        help="left padding a generate call may add, as a fraction of its rows' prompt tokens: requests of "
        "like prompt length share a call (default 0.25)",
    )
    p.add_argument(
        "--max-queue", type=int, default=256, metavar="N", help="queued rows before 503 (default 256)"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        metavar="N",
        help="the default and the largest max_tokens; each transcription segment's limit",
    )
    p.add_argument(
        "--max-upload-mb", type=float, default=25.0, metavar="MB", help="request body limit (default 25)"
    )
    p.add_argument(
        "--allow-audio-urls", action="store_true", help="fetch http(s) audio_url parts (default: refuse)"
    )
    p.add_argument(
        "--served-model-name", default=None, metavar="NAME", help="the model id (default: folder name)"
    )
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="compute dtype")
    p.add_argument(
        "--quantize", default=None, choices=["int8", "int4"], help="weight-only int8 or int4 decoder, lm_head"
    )
    p.add_argument(
        "--adapter", default=None, metavar="DIR", help="a LoRA adapter folder, merged (e.g. MODEL/think)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads (default on the CPU: all cores but one, which the requests' HTTP, audio "
        "decoding and features need beside generation)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (a graph per batch size: slow to warm up with varying batches)",
    )
    p.set_defaults(run=run_serve)
    return p


def options_from(args: argparse.Namespace):
    """ServeOptions from parsed arguments; ConfigError naming a bad value."""
    from minaf3.serve.app import ServeOptions

    for name in ("port", "max_batch_size", "max_queue", "max_new_tokens", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "port" else 1):
            raise ConfigError(f"--{name.replace('_', '-')} {value}: expected a positive integer")
    if args.batch_window_ms < 0 or args.max_upload_mb <= 0 or args.max_padding < 0:
        raise ConfigError("--batch-window-ms and --max-padding must be >= 0 and --max-upload-mb > 0")
    return ServeOptions(
        model_id=args.served_model_name or Path(args.model).resolve().name,
        api_key=args.api_key or None,
        max_batch_size=args.max_batch_size,
        batch_window=args.batch_window_ms / 1000,
        max_queue=args.max_queue,
        max_tokens=args.max_new_tokens,
        max_body_bytes=int(args.max_upload_mb * 2**20),
        allow_audio_urls=args.allow_audio_urls,
        compile=args.compile,
        max_padding=args.max_padding,
    )


def check_adapter(args: argparse.Namespace) -> bool:
    """Whether --adapter is the checkpoint's own think/ (loaded by minaf3.load(think=True)); refuses a
    missing folder, and another adapter together with --quantize."""
    from minaf3.model import THINK_FOLDER

    if args.adapter is None:
        return False
    if not Path(args.adapter).is_dir():
        raise CheckpointError(f"--adapter {args.adapter}: no such adapter folder")
    own = Path(args.adapter).resolve() == (Path(args.model) / THINK_FOLDER).resolve()
    if args.quantize and not own:
        raise ConfigError(
            f"--adapter {args.adapter} with --quantize: an adapter must be merged before quantizing, which "
            f"only the checkpoint's own {THINK_FOLDER}/ does at load time; drop --quantize or use it"
        )
    return own


def torch_threads(args: argparse.Namespace) -> int | None:
    """--threads, or on the CPU all cores but one: generation shares the machine with the request path
    (uvicorn, JSON, base64 and audio decoding, log-mel), and torch's threads on every core would make the
    two take turns, each waiting at the other's barriers (a batch of 21 rows ran 4x slower so on 2 cores)."""
    if args.threads is not None:
        return args.threads
    if args.device not in (None, "cpu"):
        return None
    return max(1, len(os.sched_getaffinity(0)) - 1)


def load_pipeline(args: argparse.Namespace):
    """minaf3.load with the server's model options, and the adapter if one is given."""
    import minaf3

    own = check_adapter(args)
    pipe = minaf3.load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize, think=own)
    pipe.think = False  # AF-Think's request is added per request ("think": true), not to every chat
    if args.adapter is not None and not own:
        pipe.model.load_adapter(args.adapter, merge=True)
    return pipe


def make_server(args: argparse.Namespace):
    """The uvicorn server for parsed `serve` arguments (run it with .run(); tests run it in a thread)."""
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (uploads)
        import uvicorn
    except ImportError as exc:
        raise ConfigError(
            f"minaf3 serve needs the serve extra ({exc.name} is missing): {SERVE_EXTRA}"
        ) from None
    from minaf3.pipeline import check_model_folder
    from minaf3.serve.app import create_app

    options = options_from(args)
    check_model_folder(args.model)
    check_adapter(args)
    threads = torch_threads(args)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)  # every thread's intra-op pool, the batcher's included

    class Server(uvicorn.Server):
        """uvicorn's server, saying where it listens, and marking the app as draining before it starts its
        graceful shutdown."""

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:  # the address as bound: --port 0 gets a free port
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                logger.info(
                    "minaf3 serve: listening on http://%s:%d/ (model %s)", host, port, options.model_id
                )

        def handle_exit(self, sig, frame):
            state = app.minaf3
            if not state.draining:
                state.draining = True
                logger.warning(
                    "minaf3 serve: %s: finishing %d request(s) in flight, refusing new ones",
                    signal.Signals(sig).name,
                    state.in_flight,
                )
            super().handle_exit(sig, frame)

    def stop(exc: BaseException) -> None:
        server.should_exit = True

    app = create_app(options, lambda: load_pipeline(args), on_load_error=stop)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=None
    )
    server = Server(config)
    return server


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or Ctrl-C; a model that fails to load is an error (exit status 2)."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    server = make_server(args)
    sys.setswitchinterval(GIL_SWITCH_SECONDS)  # this process is the server's alone
    server.run()
    error = server.config.app.minaf3.load_error
    if isinstance(error, Minaf3Error):
        raise error
    if error is not None:
        raise RuntimeError(f"loading the model failed: {error}") from error
    return 0
