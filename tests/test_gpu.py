"""The engine on CUDA: the same contract as on the CPU (skipped without a GPU)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.test_engine import prompt, run
from tokenmill.config import EngineConfig
from tokenmill.engine.loader import load_engine
from tokenmill.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_engine(llama_dir):
    return load_engine(EngineConfig(model=str(llama_dir), device="cuda", dtype="float32"), str(llama_dir), "tiny").engine


def test_greedy_on_cuda_equals_model_generate(cuda_engine, llama_dir):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).to("cuda").eval()
    ids = tok("def main():", return_tensors="pt").input_ids.to("cuda")
    ref = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :]
    [(text, _, _)], _ = run(cuda_engine, "g", [prompt(cuda_engine, "def main():")], SamplingParams(max_tokens=16, temperature=0.0))
    assert text == tok.decode(ref, skip_special_tokens=True)


def test_seeded_sampling_on_cuda_is_reproducible(cuda_engine):
    params = SamplingParams(max_tokens=12, seed=3, n=2, logprobs=2)
    first, _ = run(cuda_engine, "a", [prompt(cuda_engine, "x")], params)
    second, _ = run(cuda_engine, "b", [prompt(cuda_engine, "x")], params)
    assert first == second and first[0] != first[1]
