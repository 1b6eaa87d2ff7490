"""The command line: `tokenmill serve`."""

from __future__ import annotations

import argparse
import logging
import sys

from tokenmill import __version__
from tokenmill.config import EngineConfig, ServerConfig, add_options, api_key_from_env, from_args

log = logging.getLogger("tokenmill")


def build_parser() -> argparse.ArgumentParser:
    """tokenmill's commands and their options (derived from the config dataclasses)."""
    parser = argparse.ArgumentParser(prog="tokenmill", description="An OpenAI-compatible completions server.")
    parser.add_argument("--version", action="version", version=f"tokenmill {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model on /v1/completions")
    add_options(serve, EngineConfig)
    add_options(serve, ServerConfig)
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(args)


def serve(args: argparse.Namespace) -> int:
    """Load the model, then serve it until interrupted."""
    try:
        engine_config = from_args(EngineConfig, args)
        server_config = from_args(ServerConfig, args, api_key=api_key_from_env(args.api_key))
    except ValueError as exc:
        return _fail(str(exc), 2)
    if engine_config.model is None:
        return _fail("no model given: pass --model <directory | file.gguf | hub id>", 2)
    import uvicorn

    from tokenmill.engine.loader import ModelLoadError, load_engine  # torch loads here, not at import
    from tokenmill.server.api import create_app

    name = server_config.served_model_name or engine_config.model
    try:
        engine = load_engine(engine_config, engine_config.model, name)
    except ModelLoadError as exc:
        return _fail(str(exc), 1)
    i = engine.info
    log.info("loaded %s from %s: %.1fM parameters, %s on %s, context %d tokens, %s tokenizer",
             i.name, i.source, i.parameters / 1e6, i.dtype, i.device, i.max_model_len, i.tokenizer)
    app = create_app(engine, server_config)
    uvicorn.run(app, host=server_config.host, port=server_config.port, log_level=args.log_level)
    return 0


def _fail(message: str, code: int) -> int:
    print(f"tokenmill: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
