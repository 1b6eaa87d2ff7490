"""lm-evaluation-harness (`local-completions`) against a served tiny model, offline, on tasks written here.

Its loglikelihoods must be the model's own: a plain transformers forward of the same ids, to 1e-4.
"""

import json

import pytest
import torch

from tests.conftest import serve

pytestmark = pytest.mark.slow

CHOICES = [
    {"question": "def add(a, b):\n    return", "choices": ["a + b", "a - b", "None"], "answer": 0},
    {"question": "import", "choices": ["os", "sys", "json"], "answer": 1},
    {"question": "for i in", "choices": ["range(10):", "items:", "x"], "answer": 0},
]
COMPLETIONS = [{"question": "class Point:\n    def", "answer": " __init__"}, {"question": "import", "answer": " os"}]


@pytest.fixture(scope="module")
def served(llama_dir):
    yield from serve(llama_dir, "tiny-llama-eval")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Two tasks as lm-eval reads them from YAML: multiple choice (loglikelihood) and generate_until."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    for name, rows in (("choices", CHOICES), ("completions", COMPLETIONS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: '{{question}}'\n"
    (folder / "tm_choices.yaml").write_text(
        f"task: tm_choices\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'choices.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "tm_completions.yaml").write_text(
        f"task: tm_completions\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'completions.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def evaluate(served, tasks, monkeypatch, **model_args) -> dict:
    """lm-eval's simple_evaluate through its local-completions model, with every sample logged."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = {"base_url": served.url + "/v1/completions", "model": served.model, "max_retries": 1, "num_concurrent": 2, **model_args}
    return simple_evaluate(
        model="local-completions",
        model_args=",".join(f"{k}={v}" for k, v in args.items()),
        tasks=["tm_choices", "tm_completions"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
    )


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from a plain forward, split into ids as lm-eval splits them."""
    spaces = len(context) - len(context.rstrip(" "))
    context, continuation = context[: len(context) - spaces], context[len(context) - spaces :] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    start = len(tokenizer.encode(context, add_special_tokens=False))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(start, len(whole)))


@pytest.mark.parametrize(
    "model_args",
    [
        {"tokenizer_backend": "huggingface", "tokenized_requests": True},  # token ids, a local tokenizer
        {"tokenizer_backend": "remote", "tokenized_requests": False},  # text, tokenized by the server (/tokenizer_info, /tokenize)
    ],
    ids=["token-ids", "text"],
)
def test_loglikelihoods_are_the_models_own(served, tasks, monkeypatch, model_args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_args["tokenizer_backend"] == "huggingface":
        model_args = {**model_args, "tokenizer": str(served.model_dir)}
    results = evaluate(served, tasks, monkeypatch, **model_args)
    model = AutoModelForCausalLM.from_pretrained(served.model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(served.model_dir)
    samples = results["samples"]["tm_choices"]
    assert len(samples) == len(CHOICES)
    for sample in samples:
        for (context, continuation), [(reported, _greedy)] in zip(sample["arguments"], sample["resps"], strict=True):
            assert reported == pytest.approx(direct_loglikelihood(model, tokenizer, context, continuation), abs=1e-4)
    assert 0 <= results["results"]["tm_choices"]["acc,none"] <= 1
    generated = results["samples"]["tm_completions"]
    assert len(generated) == len(COMPLETIONS) and all(isinstance(s["resps"][0][0], str) for s in generated)
    assert served.idle()
