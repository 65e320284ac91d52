"""Concept Guard (generation/guard.py): its settings, token and bit masks on hand-built queries
and logits, and what it prepares from a model."""
import pytest
import torch

from vare_core.generation.guard import ConceptGuard, GuardSettings, reference_keys, unsafe_share
from vare_core.testing import tiny_pipeline

PAIR = (("circle", "square"),)


@pytest.fixture(scope="module")
def tiny_pipe():
    return tiny_pipeline(seed=0, depth=3)


def test_settings_take_one_pair_or_several_and_refuse_bad_values():
    assert GuardSettings(concepts=("circle", "square")).concepts == PAIR
    two = GuardSettings(concepts=[["circle", "square"], [" cross ", "triangle"]])
    assert two.concepts == (("circle", "square"), ("cross", "triangle"))
    for bad, word in (({"concepts": ()}, "at least one concept"), ({"concepts": (("circle", ""),)}, "non-empty"),
                      ({"concepts": PAIR, "blocks": ()}, "blocks"), ({"concepts": PAIR, "blocks": (1, 1)}, "distinct"),
                      ({"concepts": PAIR, "scales": 0}, "scales"), ({"concepts": PAIR, "warmup": -1}, "warmup"),
                      ({"concepts": PAIR, "token_threshold": 1.5}, "token_threshold"),
                      ({"concepts": PAIR, "penalty": float("nan")}, "penalty"),
                      ({"concepts": PAIR, "bit_threshold": -0.1}, "bit_threshold"),
                      ({"concepts": PAIR, "neutral": " "}, "neutral")):
        with pytest.raises(ValueError, match=word):
            GuardSettings(**bad)


def _unit(*values):
    v = torch.tensor(values, dtype=torch.float32)
    return v / v.norm()


def test_a_query_equal_to_the_unsafe_reference_is_selected():
    # one head of dim 2; references: unsafe = x axis, safe = y axis, neutral = -x
    keys = torch.stack([_unit(1, 0), _unit(0, 1), _unit(-1, 0)]).view(1, 3, 1, 2)
    queries = torch.stack([10 * _unit(1, 0), 10 * _unit(0, 1), 10 * _unit(-1, 0)]).view(1, 3, 1, 2)
    shares = unsafe_share(queries, keys)[0, 0]                     # (L,)
    assert shares[0] > 0.99 and shares[1] < 0.01 and shares[2] < 0.01
    guard = _guard(token_threshold=0.5)
    guard.keys = {1: keys}
    guard.queries = {1: queries}
    assert guard.token_shares().shape == (1, 1, 3)
    assert (guard.token_shares()[0, 0] >= 0.5).tolist() == [True, False, False]


def _guard(**settings):
    settings = GuardSettings(concepts=PAIR, blocks=(1,), **settings)
    return ConceptGuard(settings=settings, states=torch.zeros(2, 1, 4), lens=torch.ones(2, dtype=torch.long), keys={})


def _hand_built(selected_tokens):
    """A guard whose token shares are 1 on `selected_tokens` of 3 and 0 elsewhere, and logits
    rows [prompt, null, safe, unsafe] for one image, 3 tokens, one bit (2 logits)."""
    guard = _guard(token_threshold=0.5, bit_threshold=0.2, bit_growth=2.0, penalty=3.0, warmup=2)
    keys = torch.stack([_unit(1, 0), _unit(0, 1), _unit(-1, 0)]).view(1, 3, 1, 2)
    queries = torch.stack([100 * _unit(1, 0) if t in selected_tokens else 100 * _unit(0, 1) for t in range(3)])
    guard.keys, guard.queries = {1: keys}, {1: queries.view(1, 3, 1, 2)}
    prompt = torch.tensor([[1.0, 0.0]] * 3)
    null = torch.tensor([[0.0, 0.0]] * 3)
    safe = torch.tensor([[0.0, 1.0]] * 3)
    unsafe = torch.tensor([[1.1, 0.5]] * 3)     # bit value 0 within 0.1 of the prompt's, value 1 0.5 apart
    return guard, torch.stack([prompt, null, safe, unsafe])


def test_combine_guides_selected_tokens_and_close_bits_toward_the_safe_text():
    guard, logits = _hand_built(selected_tokens={0})
    cfg = 3.0
    plain = cfg * logits[0] + (1 - cfg) * logits[1]
    toward_safe = cfg * logits[2] + (1 - cfg) * logits[1] - 3.0 * (logits[3] - logits[1])
    out, mask = guard.combine(2, logits, cfg, batch=1)       # scale 2: after the warm-up
    assert mask[0].tolist() == [True, False, False]
    # scale 2: threshold 0.2 * 2**2 = 0.8 -> both logits of token 0 are close enough
    assert torch.equal(out[0, 0], toward_safe[0])
    assert torch.equal(out[0, 1:], plain[1:])                # tokens not selected: ordinary guidance


def test_the_bit_threshold_grows_per_scale_and_the_warmup_is_plain_guidance():
    guard, logits = _hand_built(selected_tokens={0, 1, 2})
    cfg = 3.0
    plain = cfg * logits[0] + (1 - cfg) * logits[1]
    toward_safe = cfg * logits[2] + (1 - cfg) * logits[1] - 3.0 * (logits[3] - logits[1])
    for scale in (0, 1):                                       # warm-up: plain, mask still reported
        out, mask = guard.combine(scale, logits, cfg, batch=1)
        assert torch.equal(out[0], plain) and bool(mask.all())
    guard.settings = GuardSettings(concepts=PAIR, blocks=(1,), token_threshold=0.5, bit_threshold=0.2,
                                   bit_growth=2.0, warmup=0)
    out, _ = guard.combine(0, logits, cfg, batch=1)          # threshold 0.2: only logit 0 (0.1 apart)
    assert torch.equal(out[0, :, 0], toward_safe[:, 0]) and torch.equal(out[0, :, 1], plain[:, 1])
    out, _ = guard.combine(2, logits, cfg, batch=1)          # threshold 0.8: both
    assert torch.equal(out[0], toward_safe)


def test_several_concepts_each_act_on_their_own_rows():
    settings = GuardSettings(concepts=(("circle", "square"), ("cross", "triangle")), blocks=(1,),
                             token_threshold=0.9, bit_threshold=10.0, warmup=0)
    guard = ConceptGuard(settings=settings, states=torch.zeros(4, 1, 4), lens=torch.ones(4, dtype=torch.long), keys={})
    keys = torch.stack([torch.stack([_unit(1, 0), _unit(0, 1), _unit(-1, 0)]),      # concept 1: x axis
                        torch.stack([_unit(0, -1), _unit(0, 1), _unit(-1, 0)])])    # concept 2: -y axis
    queries = torch.stack([100 * _unit(1, 0), 100 * _unit(0, -1)]).view(1, 2, 1, 2)  # token 0: c1, token 1: c2
    guard.keys, guard.queries = {1: keys.view(2, 3, 1, 2)}, {1: queries}
    logits = torch.randn(6, 2, 2)
    cfg = 2.0
    out, mask = guard.combine(0, logits.unsqueeze(1).reshape(6, 2, 2), cfg, batch=1)
    toward = lambda i: cfg * logits[2 + 2 * i] + (1 - cfg) * logits[1] - 3.0 * (logits[3 + 2 * i] - logits[1])  # noqa: E731
    assert torch.allclose(out[0, 0], toward(0)[0]) and torch.allclose(out[0, 1], toward(1)[1])
    assert mask[0].tolist() == [True, True]


def test_prepare_reads_the_model_and_orders_the_rows(tiny_pipe):
    pipe = tiny_pipe
    settings = GuardSettings(concepts=(("circle", "square"), ("cross", "triangle")), blocks=(0, 1))
    guard = ConceptGuard.prepare(settings, pipe.model, pipe.encode_prompts)
    heads, head_dim = pipe.model.cfg.num_heads, pipe.model.cfg.head_dim
    assert set(guard.keys) == {0, 1} and guard.keys[0].shape == (2, 3, heads, head_dim)
    assert torch.allclose(guard.keys[1].norm(dim=-1), torch.ones(2, 3, heads))
    states, lens = pipe.encode_prompts(["square", "circle", "triangle", "cross"])
    assert guard.rows_per_image == 4
    for row in range(4):
        assert torch.allclose(guard.states[row, :lens[row]], states[row, :lens[row]], atol=1e-5)
    # the neutral reference is the same for every concept
    assert torch.equal(guard.keys[0][0, 2], guard.keys[0][1, 2])
    batched, batched_lens = guard.batch_states(3)
    assert batched.shape[0] == 12 and batched_lens.tolist() == lens.repeat_interleave(3).tolist()
    with pytest.raises(ValueError, match="blocks 0 to"):
        ConceptGuard.prepare(GuardSettings(concepts=PAIR, blocks=(7,)), pipe.model, pipe.encode_prompts)


def test_reference_keys_are_the_key_projection_of_the_pooled_text(tiny_pipe):
    attention = tiny_pipe.model.blocks[0].ca
    pooled = torch.randn(2, attention.mat_kv.weight.shape[1])
    keys = reference_keys(attention, pooled)
    dim = attention.heads * attention.head_dim
    expected = (pooled @ attention.mat_kv.weight[:dim].T).view(2, attention.heads, attention.head_dim)
    assert torch.allclose(keys, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5)
