"""The command line: `tokenmill serve`, `tokenmill pull`, `tokenmill models`, `tokenmill bench`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from tokenmill import __version__
from tokenmill.config import EngineConfig, ServerConfig, add_options, api_keys_from, from_args

log = logging.getLogger("tokenmill")


class DefaultsFormatter(argparse.HelpFormatter):
    """--help says each option's default, unless its text already does."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default in ([], (), argparse.SUPPRESS)  # 0 is a default
        if "default" in text or unset or action.option_strings == []:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def build_parser() -> argparse.ArgumentParser:
    """tokenmill's commands and their options (serve's derived from the config dataclasses)."""
    parser = argparse.ArgumentParser(prog="tokenmill", description="An OpenAI-compatible completions and chat server.", formatter_class=DefaultsFormatter)
    parser.add_argument("--version", action="version", version=f"tokenmill {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"), help="the least severe messages logged")
    common.add_argument("--log-format", default="text", choices=("text", "json"), help="json: one object a line, for log collectors")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        parents=[common],
        formatter_class=DefaultsFormatter,
        help="serve a model on /v1/completions and /v1/chat/completions (default: SmolLM2-135M-Instruct)",
    )
    add_options(serve, EngineConfig)
    add_options(serve, ServerConfig)
    pull = commands.add_parser(
        "pull", parents=[common], formatter_class=DefaultsFormatter, help="fetch a model into the cache: the default, a hub id, or a .gguf file"
    )
    pull.add_argument("model", nargs="?", default=None, help="hub id (org/name) or path/to/file.gguf (default: SmolLM2-135M-Instruct)")
    commands.add_parser("models", parents=[common], formatter_class=DefaultsFormatter, help="list the cached models")
    _add_bench(commands, common)
    return parser


BENCHMARKS = {
    "serve": "load any OpenAI-compatible /v1/completions server: throughput, TTFT, TPOT, ITL",
    "offline": "the engine alone, in-process, no HTTP: what the server costs on top",
    "ceiling": "one decode step's matmul time per batch size, and the batch-1 memory floor",
    "compare": "tokenmill, an older tokenmill, vLLM and llama.cpp side by side, one at a time or in alternated rounds",
}


def _add_bench(commands, common: argparse.ArgumentParser) -> None:
    """`tokenmill bench NAME`: each benchmark module adds its own options."""
    import importlib

    bench = commands.add_parser("bench", formatter_class=DefaultsFormatter, help="measure a server, the engine, or this machine's ceiling")
    kinds = bench.add_subparsers(dest="bench", required=True)
    for name, summary in BENCHMARKS.items():
        module = importlib.import_module(f"tokenmill.benchmarks.{name}")  # their imports are light: no torch, no httpx
        module.add_arguments(kinds.add_parser(name, parents=[common], help=summary, description=summary, formatter_class=DefaultsFormatter))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tokenmill.logs import configure

    configure(args.log_level, args.log_format)
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")  # progress as log lines, not bars, in logs
    return {"serve": serve, "pull": pull, "models": models, "bench": bench}[args.command](args)


def serve(args: argparse.Namespace) -> int:
    """Resolve and load the model, then serve it until interrupted."""
    try:
        engine_config = from_args(EngineConfig, args)
        server_config = from_args(ServerConfig, args, api_key=api_keys_from(args.api_key, args.api_key_file))
    except ValueError as exc:
        return _fail(str(exc), 2)
    from tokenmill.models.sources import FetchError, resolve

    try:
        model = resolve(engine_config.model, _cache())
    except FetchError as exc:  # before torch loads: a mistyped model fails in a second, not seven
        return _fail(str(exc), 1)
    from tokenmill.engine.loader import ModelLoadError, load_engine  # torch loads here, not at import
    from tokenmill.server.api import create_app
    from tokenmill.server.lifecycle import run

    try:
        engine = load_engine(engine_config, model.path, server_config.served_model_name or model.name)
    except ModelLoadError as exc:
        return _fail(str(exc), 1)
    i = engine.info
    log.info(
        "loaded %s from %s: %.1fM parameters, %s on %s, context %d tokens, %s tokenizer",
        i.name,
        i.source,
        i.parameters / 1e6,
        i.dtype,
        i.device,
        i.max_model_len,
        i.tokenizer,
    )
    app = create_app(engine, server_config)
    return run(app, app.state.lifecycle, server_config.host, server_config.port, args.log_level)


def pull(args: argparse.Namespace) -> int:
    """Fetch a model into the cache and say where it is."""
    from tokenmill.engine.loader import ModelLoadError
    from tokenmill.models.sources import FetchError
    from tokenmill.models.sources import pull as pull_model

    try:
        name, path = pull_model(args.model, _cache())
    except (FetchError, ModelLoadError, OSError, ValueError) as exc:
        return _fail(str(exc), 1)
    print(f"{name}\t{path}")
    return 0


def models(args: argparse.Namespace) -> int:
    """List the cached models: name, size, where they came from, where they are."""
    entries = _cache().entries()
    if not entries:
        print(f"no models cached in {_cache().root}")
    for e in entries:
        print(f"{e.name}\t{e.size / 1e6:.0f} MB\t{e.source}\t{e.path}")
    return 0


def bench(args: argparse.Namespace) -> int:
    """Run the benchmark named on the command line."""
    import importlib

    return importlib.import_module(f"tokenmill.benchmarks.{args.bench}").run(args)


def _cache():
    from tokenmill.models.cache import ModelCache, default_home

    return ModelCache(default_home())


def _fail(message: str, code: int) -> int:
    print(f"tokenmill: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
