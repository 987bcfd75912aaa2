import pytest
import torch

from mambakit.generation import generate, sample_next_token, stream_generate
from tests.fixtures import tiny_model


def greedy_by_full_forwards(model, prompt, n):
    """Re-run the whole sequence each step: no cache involved."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1, : model.config.vocab_size]
            seq.append(int(logits.argmax()))
    return seq


@pytest.mark.parametrize("kind,hybrid", [("mamba1", False), ("mamba2", True), ("mamba3-mimo", False), ("mamba3", True)])
def test_greedy_matches_full_forwards(kind, hybrid):
    model = tiny_model(kind, hybrid)
    prompt = [5, 17, 3, 44, 9]
    assert model.generate([prompt], max_new_tokens=12, temperature=0) == [greedy_by_full_forwards(model, prompt, 12)]


@pytest.mark.parametrize("kind,hybrid", [("mamba1", False), ("mamba2-g2", True), ("mamba3", True)])
def test_ragged_batch_equals_each_prompt_alone(kind, hybrid):
    model = tiny_model(kind, hybrid)
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [40]]
    batch = model.generate(prompts, max_new_tokens=10, temperature=0)
    alone = [model.generate([p], max_new_tokens=10, temperature=0)[0] for p in prompts]
    assert batch == alone


def test_tensor_input_returns_tensor():
    model = tiny_model("mamba2")
    ids = torch.randint(0, 61, (3, 4), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=6, temperature=0)
    assert out.shape == (3, 10) and torch.equal(out[:, :4], ids)
    assert out[1].tolist() == model.generate([ids[1].tolist()], max_new_tokens=6, temperature=0)[0]


def test_sampling_is_repeatable_with_a_seed_and_varies_without():
    model = tiny_model("mamba1")
    first = model.generate([[1, 2]], max_new_tokens=20, temperature=1.5, seed=7)
    assert first == model.generate([[1, 2]], max_new_tokens=20, temperature=1.5, seed=7)
    others = {tuple(model.generate([[1, 2]], max_new_tokens=20, temperature=1.5, seed=s)[0]) for s in range(5)}
    assert len(others) > 1


def test_eos_stops_a_row():
    model = tiny_model("mamba2")
    free = model.generate([[3, 4, 5]], max_new_tokens=8, temperature=0)[0]
    eos = free[3 + 2]  # the third generated token
    stopped = model.generate([[3, 4, 5], [9]], max_new_tokens=8, temperature=0, eos_token_id=eos)
    first_eos = free.index(eos, 3)
    assert stopped[0] == free[: first_eos + 1]
    as_tensor = model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=8, temperature=0, eos_token_id=eos)
    assert (as_tensor[0, first_eos:] == eos).all()


def test_streamer_sees_every_step_in_order():
    model = tiny_model("mamba3")
    seen = []
    out = model.generate([[1, 2, 3], [4]], max_new_tokens=7, temperature=0, streamer=lambda t: seen.append(t.tolist()))
    assert [row[0] for row in seen] == out[0][3:] and [row[1] for row in seen] == out[1][1:]
    steps = list(stream_generate(model, [[1, 2, 3]], max_new_tokens=7, temperature=0))
    assert [int(t[0]) for t in steps] == out[0][3:]


def test_padded_vocabulary_is_never_sampled():
    model = tiny_model("mamba1")  # vocab 61 padded to 64
    with torch.no_grad():
        model.lm_head.weight[61:] = 0
        model.backbone.embedding.weight[61:] = 50.0  # would dominate if not masked (tied head)
    out = model.generate([[1, 2, 3]], max_new_tokens=30, temperature=2.0, seed=0)[0]
    assert max(out) < 61


def test_sample_next_token_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, temperature=0).item() == 4
    assert {sample_next_token(logits, top_k=1, generator=g).item() for _ in range(20)} == {4}
    assert {sample_next_token(logits, top_k=2, generator=g).item() for _ in range(200)} == {0, 4}
    assert {sample_next_token(logits, top_p=0.01, generator=g).item() for _ in range(20)} == {4}
    p = torch.softmax(logits, -1)[0]
    # top_p = p4 + p0 + tiny: exactly the two most likely tokens survive.
    top2 = {sample_next_token(logits, top_p=(p[4] + p[0]).item() - 1e-6, generator=g).item() for _ in range(300)}
    assert top2 == {0, 4}
    assert {sample_next_token(logits, min_p=0.3, generator=g).item() for _ in range(200)} == {0, 4}  # e^-1 > 0.3 > e^-2
    seen = torch.tensor([[False, False, False, False, True]])
    assert sample_next_token(logits, seen, temperature=0, repetition_penalty=2.0).item() == 0  # 3/2 < 2
    negative = torch.tensor([[-1.0, -1.2]])
    assert sample_next_token(negative, torch.tensor([[True, False]]), temperature=0, repetition_penalty=1.5).item() == 1


def test_sampling_follows_the_softmax_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, 3)
    g = torch.Generator().manual_seed(1)
    counts = torch.bincount(sample_next_token(logits, temperature=2.0, generator=g), minlength=3).double()
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0]) / 2.0, -1).double() * 20000
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 13.8  # 99.9% quantile of chi-square with 2 degrees of freedom


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(min_p=1.0), "min_p"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(eos_token_id=500), "eos_token_id"),
        (dict(max_length=5), "exceeds max_length"),
    ],
)
def test_bad_options(kwargs, match):
    model = tiny_model("mamba1")
    with pytest.raises(ValueError, match=match):
        generate(model, [[1, 2, 3]], **{"max_new_tokens": 4, **kwargs})


def test_bad_prompts():
    model = tiny_model("mamba1")
    with pytest.raises(ValueError, match="outside"):
        model.generate([[1, 99]])
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([[1], []])
    with pytest.raises(TypeError, match="input_ids"):
        model.generate("hello")


def test_cuda_graph_option_is_checked():
    model = tiny_model("mamba1")
    with pytest.raises(TypeError, match="cuda_graph"):
        model.generate([[1, 2]], max_new_tokens=2, cuda_graph="yes")
    with pytest.raises(ValueError, match="CUDA device"):
        model.generate([[1, 2]], max_new_tokens=2, cuda_graph=True)
    # the default on CPU decodes eagerly
    assert model.generate([[1, 2]], max_new_tokens=3, temperature=0) == \
        model.generate([[1, 2]], max_new_tokens=3, temperature=0, cuda_graph=False)
