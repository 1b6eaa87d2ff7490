"""Tiny models built in-process (a BPE trained on stdlib sources, random weights), and servers."""

from __future__ import annotations

import glob
import os
import socket
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SPECIALS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>"]
CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>"]
# ChatML, as SmolLM2 and Qwen2 write it, plus a refusal to test how a template's error is reported.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['content'] == 'RAISE' %}{{ raise_exception('this template refuses RAISE') }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is not none %}{{- message['content'] }}{%- endif %}"
    "{%- for call in message.get('tool_calls') or [] %}{{- '<tool_call>' + call['function']['name'] + '</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# ChatML with tools written Hermes-style (as Qwen2.5's template does): listed in a system turn, calls as <tool_call> JSON.
HERMES_TEMPLATE = (
    '{%- if tools %}{{- \'<|im_start|>system\nCall a function by writing <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>.\n<tools>\' }}'
    "{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}{{- '\n</tools><|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is not none %}{{- message['content'] }}{%- endif %}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{{- '<tool_call>\n' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson) + '\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]


def train_tokenizer(fim: bool, chat: bool = False):
    """A byte-level BPE with a 1k vocabulary, trained on a few stdlib files (~0.5 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:40]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = (SPECIALS if fim else SPECIALS[:1]) + (CHAT_SPECIALS if chat else [])
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(files, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def build_model(
    kind: str, path: Path, bos: bool = False, padding: int = 0, chat: bool = False, tools: bool = False, inter: int = 128, mlp_bias: bool = False
) -> Path:
    """Save a random-weight llama (with FIM tokens), qwen2 or gpt2 (without) and its tokenizer.

    bos: the tokenizer puts <|endoftext|> before every text; padding: extra embedding rows past the
    tokenizer's vocabulary, as many real models have; chat: ChatML's special tokens and CHAT_TEMPLATE;
    tools: HERMES_TEMPLATE and <tool_call> / </tool_call> as tokens of their own (not special, as in Qwen2.5);
    inter, mlp_bias: the llama's MLP width, and biases on its MLP projections.
    """
    import torch
    from tokenizers import processors
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = train_tokenizer(fim=kind == "llama", chat=chat)
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    if tools:
        tokenizer.add_tokens(TOOL_TOKENS)
        tokenizer.chat_template = HERMES_TEMPLATE
    if bos:
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer) + padding,
            hidden_size=64,
            intermediate_size=inter,
            mlp_bias=mlp_bias,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024 if tools else 256,  # the tools' system turn is long
            bos_token_id=0,
            eos_token_id=0,
        )
        model = LlamaForCausalLM(config)
    elif kind == "qwen2":  # biases on q/k/v, unlike llama
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=256,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = Qwen2ForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return build_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def bos_llama_dir(tmp_path_factory) -> Path:
    return build_model("llama", tmp_path_factory.mktemp("tiny-llama-bos"), bos=True, padding=40)


@pytest.fixture(scope="session")
def chat_llama_dir(tmp_path_factory) -> Path:
    return build_model("llama", tmp_path_factory.mktemp("tiny-llama-chat"), chat=True)


@pytest.fixture(scope="session")
def hermes_llama_dir(tmp_path_factory) -> Path:
    return build_model("llama", tmp_path_factory.mktemp("tiny-llama-hermes"), chat=True, tools=True)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    return build_model("qwen2", tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return build_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def long_llama_dir(llama_dir, tmp_path_factory) -> Path:
    """The tiny llama with an 8192-token context, so that a request can take seconds (6,000 tokens: ~7 s)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama-long")
    config = LlamaConfig.from_pretrained(llama_dir)
    config.max_position_embeddings = 8192
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(path)
    return path


def wait_healthy(url: str, timeout: float, proc=None) -> None:
    """Wait until `url`/health answers 200 (failing early if `proc`, the server's process, exits)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert proc is None or proc.poll() is None, "the server exited while starting"
        assert time.monotonic() < deadline, f"the server did not start in {timeout} s"
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def fail_next_step(served, monkeypatch) -> None:
    """Make the served engine's next model step raise, as a failing device would; later steps run."""
    runner = served.engine.engine.runner
    real = runner.execute

    def broken(*args):
        monkeypatch.setattr(runner, "execute", real)
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(runner, "execute", broken)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    """A real tokenmill server on 127.0.0.1, and the engine behind it."""

    url: str
    model: str
    engine: object
    model_dir: Path
    api_key: str | None = None

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kwargs)

    def idle(self, timeout: float = 5.0) -> bool:
        """Wait until the engine holds no request and every KV block is free."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            inner = self.engine.engine
            if not inner.has_unfinished() and inner.num_active() == 0 and inner.blocks.num_free == inner.blocks.num_blocks:
                return True
            time.sleep(0.02)
        return False


def serve(model_dir: Path, name: str, api_key: str | None = None, engine_options: dict | None = None, **server_options):
    """Start tokenmill's uvicorn server in a thread on a free port; yield a Served; stop it after."""
    import uvicorn

    from tokenmill.config import EngineConfig, ServerConfig
    from tokenmill.engine.loader import load_engine
    from tokenmill.server.api import create_app
    from tokenmill.server.lifecycle import Server

    engine = load_engine(EngineConfig(model=str(model_dir), **(engine_options or {})), str(model_dir), name)
    config = ServerConfig(port=free_port(), api_key=api_key, **server_options)
    app = create_app(engine, config)
    server = Server(uvicorn.Config(app, host="127.0.0.1", port=config.port, log_level="warning", log_config=None), app.state.lifecycle)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield Served(f"http://127.0.0.1:{config.port}", name, engine, model_dir, api_key)
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def llama(llama_dir):
    yield from serve(llama_dir, "tiny-llama")


@pytest.fixture(scope="session")
def gpt2(gpt2_dir):
    yield from serve(gpt2_dir, "tiny-gpt2", api_key="sk-test-key")


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu skip cleanly where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def metaspace_llama_dir(tmp_path_factory) -> Path:
    """A llama whose tokenizer is SentencePiece-style (Metaspace, like Llama 2 and Mistral)."""
    import torch
    from tokenizers import SentencePieceBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:40]
    sp = SentencePieceBPETokenizer()
    sp.train(files, vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    path = tmp_path_factory.mktemp("tiny-llama-metaspace")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
