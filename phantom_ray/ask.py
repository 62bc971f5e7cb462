"""``phantom-ray ask``: give images and a question, get the answer streamed to the terminal.

    phantom-ray ask --model BK-Lee/Phantom-0.5B --image cat.jpg "What is the cat doing?"
    phantom-ray ask --model ./runs/export          # no question: a small interactive chat

The model id is the same as everywhere (preset, directory, ``s3://`` prefix, hub id); the answer
comes from the one engine interface (:func:`phantom_ray.infer.api.load_engine`), streamed as it
is generated. In the chat, ``/image PATH_OR_URL`` attaches an image to the next question,
``/reset`` starts over (history and images), ``/quit`` (or end of input) leaves; the history is kept
across turns.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any, Callable

CHAT_HELP = "commands: /image PATH_OR_URL (attach to the next question), /reset, /quit"


class AskError(Exception):
    """A user mistake (missing model or image, unreadable file): printed as one line, exit status 2."""


def open_source(source: str):
    """A PIL image from a local path, ``s3://`` URI, ``data:`` URI or http(s) URL, opened by the one
    image-ingest function (a CLI argument is trusted input: no root confinement)."""
    from phantom_ray.ingest import FetchPolicy, InputError, load_image

    try:
        # an image named on the command line may come from any http(s) host the user names
        return load_image(source, FetchPolicy(allowed_urls=_url_prefix(source)))
    except InputError as exc:
        raise AskError(f"image {source}: {exc}") from None
    except OSError as exc:
        raise AskError(f"image {source}: {exc.strerror or exc}") from None


def _url_prefix(source: str) -> tuple[str, ...]:
    from urllib.parse import urlsplit

    parts = urlsplit(source)
    if parts.scheme in ("http", "https") and parts.netloc:
        return (f"{parts.scheme}://{parts.netloc}/",)
    return ()


def load(model: str, backend: str = "auto", **options):
    """The engine, or :class:`AskError` with one line when the model id cannot be loaded."""
    import os

    from phantom_ray.infer.api import load_engine

    # a hub id is "owner/name"; anything else with slashes (or ./, ~/) names a local directory
    looks_local = "://" not in model and (model.startswith((".", "/", "~")) or model.count("/") > 1)
    if looks_local and not os.path.exists(os.path.expanduser(model)):
        raise AskError(f"model {model}: no such directory")
    try:
        return load_engine(model, backend=backend, **options)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise AskError(f"model {model}: not found ({_first_line(exc)})") from None
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise AskError(f"model {model}: cannot be loaded ({type(exc).__name__}: {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def stream_answer(engine, messages: list[dict], images: list, params, out) -> tuple[str, Any]:
    """Stream one answer to ``out`` as it is generated; returns (text, the final event)."""
    from phantom_ray.infer.api import Request

    pieces: list[str] = []
    final = None
    async for ev in engine.stream(Request(messages=list(messages), images=list(images), params=params)):
        if ev.type == "delta":
            pieces.append(ev.text)
            out.write(ev.text)
            out.flush()
        else:
            final = ev
    out.write("\n")
    out.flush()
    if final is not None and final.type == "error":
        raise AskError(f"{final.code or 'error'}: {final.message}")
    return "".join(pieces), final


async def chat(engine, params, read_line: Callable[[], str], out, err, images: list | None = None,
               prompt: str = "") -> int:
    """The interactive loop; ``read_line`` returns '' at end of input. Returns the exit status."""
    history: list[dict] = []
    all_images: list = []
    pending: list = list(images or [])
    print(f"chat with {engine.model_id} ({engine.backend} engine); {CHAT_HELP}", file=err, flush=True)
    while True:
        if prompt:
            out.write(prompt)
            out.flush()
        line = await asyncio.to_thread(read_line)
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history, all_images, pending = [], [], []
            print("(history and images cleared)", file=err, flush=True)
            continue
        if line.startswith("/image"):
            src = line[len("/image"):].strip()
            if not src:
                print("usage: /image PATH_OR_URL", file=err, flush=True)
                continue
            try:
                pending.append(open_source(src))
            except AskError as exc:
                print(f"error: {exc}", file=err, flush=True)
                continue
            print(f"(image {len(all_images) + len(pending)} attached: {src})", file=err, flush=True)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]!r}; {CHAT_HELP}", file=err, flush=True)
            continue
        # placeholders in this turn, image first as the processor lays out a one-turn prompt
        text = "<image>" * len(pending) + line if pending and "<image>" not in line else line
        turn = history + [{"role": "user", "content": text}]
        try:
            answer, _ = await stream_answer(engine, turn, all_images + pending, params, out)
        except AskError as exc:
            print(f"error: {exc}", file=err, flush=True)
            continue
        history = turn + [{"role": "assistant", "content": answer}]
        all_images += pending
        pending = []


def run(args: argparse.Namespace) -> int:
    from phantom_ray.infer.api import SamplingParams
    from phantom_ray.logs import setup_logging

    setup_logging(None, verbose=args.verbose, name="ask", announce=args.verbose)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=args.seed)
        images = [open_source(src) for src in args.image]
        options = {} if args.device is None else {"device": args.device}
        engine = load(args.model, backend=args.engine, **options)
    except (AskError, ValueError) as exc:
        print(f"phantom-ray ask: {exc}", file=sys.stderr)
        return 2
    try:
        if args.question:
            from phantom_ray.infer.api import Request

            req = Request.user(" ".join(args.question), images=images, params=params)
            try:
                asyncio.run(stream_answer(engine, req.messages, req.images, params, sys.stdout))
            except AskError as exc:
                print(f"phantom-ray ask: {exc}", file=sys.stderr)
                return 1
            return 0
        prompt = "> " if sys.stdin.isatty() else ""
        return asyncio.run(chat(engine, params, sys.stdin.readline, sys.stdout, sys.stderr, images=images,
                                prompt=prompt))
    except KeyboardInterrupt:
        return 130
    finally:
        engine.close()


def register(sub) -> None:
    from phantom_ray.logs import add_verbose_flag

    p = sub.add_parser("ask", help="ask a model about images: one answer streamed, or a chat without a question",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example (after `make quickstart`):\n  phantom-ray ask --model .phantom_ray_quickstart/step2-export "
                              "--image .phantom_ray_quickstart/caption-input/heldout-000000.png \"What colour is the shape?\"")
    p.add_argument("--model", required=True, help="preset name, checkpoint directory, s3:// prefix or hub id")
    p.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL",
                   help="an image (local path, s3://, data: URI or http(s) URL); repeat for several")
    p.add_argument("question", nargs="*", help="the question; none: an interactive chat")
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "vllm"],
                   help="generation backend (auto: vLLM where installed, else torch)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the engine's choice)")
    add_verbose_flag(p)
    p.set_defaults(func=run)
