"""Command line: serve the web UI, or answer one question in the terminal and exit.

    python app.py                                        # web UI on http://127.0.0.1:7860
    python app.py --model DIR --image cat.jpg --prompt "What is this?"   # one answer to stdout

Every error a user can cause ends in one line on stderr and a non-zero exit code:
2 for bad flags, 1 for everything else (model, image, GPU, port).
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import re
import socket
import sys
import tempfile

EXIT_USAGE, EXIT_FAILURE = 2, 1


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(EXIT_USAGE, f"error: {message} (see python app.py --help)\n")


def build_parser() -> Parser:
    from vlui.models import DEFAULT_MODEL

    p = Parser(prog="python app.py", description="Chat with a vision-language model (360VL, LLaVA-Llama-3) in "
               "the browser, or ask one question in the terminal with --prompt.")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=os.environ.get("VLUI_MODEL", DEFAULT_MODEL),
                   help="Hugging Face model id or local directory (default: %(default)s; env VLUI_MODEL)")
    m.add_argument("--device", default=os.environ.get("VLUI_DEVICE", "auto"), type=device_flag,
                   help="auto (GPU if there is one; several GPUs share a big model), cuda, cuda:N or cpu "
                        "(env VLUI_DEVICE)")
    m.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bfloat16 on GPU, float32 on CPU")
    m.add_argument("--quantize", choices=["none", "4bit"], default="none",
                   help="4bit: bitsandbytes NF4 weights (needs `pip install bitsandbytes` and a CUDA GPU)")
    m.add_argument("--local-files-only", action="store_true", help="never contact the Hugging Face Hub")
    s = p.add_argument_group("web server")
    s.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to listen on (default %(default)s; 0.0.0.0 to serve the network)")
    s.add_argument("--port", type=int, default=None, help="default 7860 (env GRADIO_SERVER_PORT)")
    s.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    s.add_argument("--auth", default=os.environ.get("VLUI_AUTH"), metavar="USER:PASSWORD",
                   help="require this login (env VLUI_AUTH)")
    s.add_argument("--max-image-mb", type=float, default=20.0, help="largest accepted image file")
    e = p.add_argument_group("engine")
    e.add_argument("--max-batch", type=int, default=32, help="conversations decoded at once (KV-cache slots)")
    e.add_argument("--max-context", type=int, default=None, help="tokens per conversation (default: the model's)")
    e.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot before 'busy'")
    e.add_argument("--no-compile", action="store_true",
                   help="skip torch.compile and CUDA graphs (faster start, slower answers)")
    g = p.add_argument_group("generation (defaults of the UI's sliders, or the one-shot answer)")
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--temperature", type=float, default=0.0, help="0 means greedy decoding")
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--system-prompt", default=None, help="replace the model's default system prompt ('' for none)")
    o = p.add_argument_group("one-shot terminal mode")
    o.add_argument("--prompt", help="answer this question on stdout and exit (no UI)")
    o.add_argument("--image", help="image file for --prompt")
    return p


def device_flag(value: str) -> str:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        return value
    raise argparse.ArgumentTypeError(f"invalid --device '{value}': use auto, cuda, cuda:N or cpu")


def check_flags(args) -> str | None:
    """What is wrong with the flags, as a sentence, or None."""
    if args.port is None:
        env = os.environ.get("GRADIO_SERVER_PORT", "7860")
        if not env.isdigit():
            return f"GRADIO_SERVER_PORT must be a port number (got '{env}')"
        args.port = int(env)
    if not 0 < args.port < 65536:
        return f"--port must be between 1 and 65535 (got {args.port})"
    if args.prompt is not None and not args.prompt.strip():
        return "--prompt is empty: give the question to ask"
    if args.image and args.prompt is None:
        return "--image needs --prompt (the question to ask about it)"
    if args.auth is not None:
        user, _, password = args.auth.partition(":")
        if not user or not password:
            return "--auth must look like USER:PASSWORD, both non-empty"
    if not (math.isfinite(args.max_image_mb) and 0 < args.max_image_mb <= 1024):
        return f"--max-image-mb must be a number of megabytes between 0 and 1024 (got {args.max_image_mb})"
    if not 1 <= args.max_batch <= 1024 or args.max_queue < 0:
        return "--max-batch must be between 1 and 1024, and --max-queue at least 0"
    if args.max_context is not None and args.max_context < 64:
        return f"--max-context must be at least 64 tokens (got {args.max_context})"
    return None


def port_is_free(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port, or None; checked before the model is loaded."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except socket.gaierror:
        return f"--host {host} is not an address of this machine"
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            return f"port {port} is in use; choose another with --port"
        return f"cannot listen on {host}:{port} ({err.strerror or err})"
    return None


def fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    # Uploads and Gradio's cache stay in the app's own temp dir; nothing is reported anywhere.
    os.environ.setdefault("GRADIO_TEMP_DIR", os.path.join(tempfile.gettempdir(), "vlui-gradio"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = build_parser().parse_args(argv)

    from vlui.engine.sampling import SamplingParams
    from vlui.images import ImageError, ImageLimits, load_image

    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty)
    try:
        params.validate()
    except ValueError as err:
        return fail(f"invalid generation setting: {err}", EXIT_USAGE)
    problem = check_flags(args)
    if problem:
        return fail(problem, EXIT_USAGE)
    limits = ImageLimits(max_bytes=int(args.max_image_mb * 1024 * 1024))
    one_shot = args.prompt is not None
    if not one_shot:
        problem = port_is_free(args.host, args.port)
        if problem:  # say so now, not after a minute of loading the model
            return fail(problem)

    image = None
    if args.image:  # check the image before spending a minute loading the model
        try:
            image = load_image(args.image, limits)
        except ImageError as err:
            return fail(str(err))

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import transformers

    import huggingface_hub
    import torch

    transformers.logging.set_verbosity_error()  # keep the weight-loading progress bar, drop library chatter
    huggingface_hub.utils.logging.set_verbosity_error()
    from vlui.engine.engine import Engine, EngineConfig, EngineError
    from vlui.models import ModelLoadError, load_model

    say = (lambda msg: None) if one_shot else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"Loading {args.model} ...")
    if args.device == "auto" and not torch.cuda.is_available():
        say("warning: no CUDA GPU found, so the model runs on the CPU in float32: an 8B model needs about 34 GB "
            "of RAM and an answer takes minutes.")
    try:
        model = load_model(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                           local_files_only=args.local_files_only)
    except ModelLoadError as err:
        return fail(str(err))
    fast = not args.no_compile and not one_shot  # compiling pays off for a server, not for one answer
    config = EngineConfig(max_batch=1 if one_shot else args.max_batch, max_seq_len=args.max_context,
                          max_queue=args.max_queue, compile=None if fast else False, cuda_graphs=None if fast else False)
    if args.max_context and args.max_context > model.context_length:
        say(f"note: --max-context {args.max_context} is more than the model's {model.context_length}; using "
            f"{model.context_length}.")
    try:
        engine = Engine(model, config).start(progress=lambda i, n, msg: say(f"[{i}/{n}] {msg}"))
    except EngineError as err:
        return fail(str(err))
    system_prompt = model.default_system_prompt if args.system_prompt is None else args.system_prompt
    try:
        if one_shot:
            return answer_once(engine, model, args.prompt, image, system_prompt, params)
        return serve(engine, args, limits, system_prompt)
    finally:
        engine.shutdown()


def answer_once(engine, model, prompt: str, image, system_prompt: str | None, params) -> int:
    from vlui.conversation import ContextTooLong, fit_conversation
    from vlui.engine.sampling import SamplingParams
    from vlui.models.base import Message

    try:
        fitted = fit_conversation(model, [Message("user", prompt, image)], system_prompt, params.max_new_tokens,
                                  engine.runner.max_seq_len)
    except ContextTooLong as err:
        return fail(str(err))
    params = SamplingParams(fitted.max_new_tokens, params.temperature, params.top_p, params.repetition_penalty)
    handle = engine.submit(fitted.prompt, params)
    try:
        for event in handle:
            if event.kind == "text":
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif event.kind == "error":
                sys.stdout.write("\n")
                return fail(event.text)
    except KeyboardInterrupt:
        handle.cancel()
        sys.stdout.write("\n")
        return 130
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def serve(engine, args, limits, system_prompt: str | None) -> int:
    from vlui.ui.app import ASSETS, Defaults, build_demo

    engine.model.default_system_prompt = system_prompt
    defaults = Defaults(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty)
    demo = build_demo(engine, defaults, limits)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    try:
        _, local_url, share_url = demo.launch(
            server_name=args.host, server_port=args.port, share=args.share, auth=auth, max_file_size=limits.max_bytes,
            allowed_paths=[str(ASSETS)], show_error=False, footer_links=["api", "settings"], quiet=True,
            prevent_thread_lock=True,
        )
    except OSError as err:
        return fail(f"cannot serve on {args.host}:{args.port}: {err}")
    print(f"vlui is serving {engine.model.name} on {local_url}" + (f" and {share_url}" if share_url else "")
          + ("" if args.share else " (for a public link, add --share)"), file=sys.stderr, flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return 0
