"""Generation through the swarm equals transformers' generate on the local model, token for token."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, StoppingCriteria, StoppingCriteriaList, TextStreamer

from tests.helpers import reference_model

PROMPTS = ["The swarm is a group of computers that", "Once upon a time"]


@pytest.fixture(scope="module")
def llama(llama_client, tiny_llama):
    return llama_client, reference_model(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def bloom(bloom_client):
    model, path = bloom_client
    return model, reference_model(path), AutoTokenizer.from_pretrained(path)


def _same(swarm_model, local_model, **kwargs) -> None:
    torch.manual_seed(0)
    ours = swarm_model.generate(**kwargs)
    torch.manual_seed(0)
    theirs = local_model.generate(**kwargs)
    assert torch.equal(ours, theirs), (ours, theirs)


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_greedy_matches_local(family, request):
    model, ref, tok = request.getfixturevalue(family)
    inputs = tok(PROMPTS[:1], return_tensors="pt")
    _same(model, ref, **inputs, max_new_tokens=24, min_new_tokens=24, do_sample=False)


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_padded_batch_matches_each_prompt_alone(family, request):
    model, ref, tok = request.getfixturevalue(family)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    ours = model.generate(**batch, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    for row, prompt in enumerate(PROMPTS):
        alone = tok([prompt], return_tensors="pt")
        theirs = ref.generate(**alone, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert torch.equal(ours[row, -16:], theirs[0, -16:])


def test_beam_search_matches_local(llama):
    model, ref, tok = llama
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    _same(model, ref, **batch, max_new_tokens=12, num_beams=3, do_sample=False)


def test_sampling_matches_local(llama):
    model, ref, tok = llama
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    _same(model, ref, **batch, max_new_tokens=16, do_sample=True, temperature=0.8, top_k=40, top_p=0.9,
          repetition_penalty=1.3)


def test_stopping_criteria_and_streamer(llama, capsys):
    model, ref, tok = llama

    class StopAfter(StoppingCriteria):
        def __init__(self, length: int):
            self.length = length

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)

    inputs = tok(PROMPTS[:1], return_tensors="pt")
    stop = StoppingCriteriaList([StopAfter(inputs["input_ids"].shape[1] + 5)])
    out = model.generate(**inputs, max_new_tokens=30, do_sample=False, stopping_criteria=stop,
                         streamer=TextStreamer(tok, skip_prompt=True))
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5
    printed = capsys.readouterr().out
    assert printed.strip() == tok.decode(out[0, inputs["input_ids"].shape[1]:]).strip()


def test_session_continues_across_generate_calls(llama):
    model, ref, tok = llama
    inputs = tok(PROMPTS[:1], return_tensors="pt")
    with model.inference_session(max_length=64) as session:
        first = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        cached = session.length
        second = model.generate(first, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert session.length > cached
    expected = ref.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(second, expected)


def test_the_entry_point_streams_text_without_special_tokens(tiny_llama, capsys):
    """`python -m swarmtune.generate` prints what it returns: an adapter's closing `</s>` is not text."""
    from swarmtune.generate import text_streamer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompt, answer = tok("Question: what do bees make? Answer:")["input_ids"], tok(" honey")["input_ids"][1:]
    streamer = text_streamer(tok)
    streamer.put(torch.tensor([prompt]))  # generate() hands the prompt over first; it is not printed again
    for token in [*answer, tok.eos_token_id]:
        streamer.put(torch.tensor([token]))
    streamer.end()
    printed = capsys.readouterr().out
    assert tok.eos_token == "</s>" and "</s>" not in printed
    assert printed.strip() == tok.decode(answer).strip()
