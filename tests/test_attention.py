"""vare_core.models.attention: RMSNorm, the cosine self-attention with RoPE and its KV cache,
the cross-attention to the text (key padding mask, optional bf16 rounding) and the attention
pooling of the text (TextPool). Module-level properties on small random layers."""
import math

import pytest
import torch

from vare_core.models import scales
from vare_core.models.attention import (MAX_SCALE_MUL, CrossAttention, PoolAttention, RMSNorm,
                                        SelfAttention, TextPool)
from vare_core.models.kv_cache import KVCache
from vare_core.models.rope import rope_table

DIM, HEADS, TEXT_DIM = 32, 4, 24
SCHEDULE = [(1, 1), (2, 2), (3, 3)]


def randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (the zero-initialised biases too), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


def block_causal_mask(schedule) -> torch.Tensor:
    counts = scales.token_counts(schedule)
    ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return ids[:, None] >= ids[None, :]


def text_batch(seed: int = 1, batch: int = 2, length: int = 6, lens=(6, 3)):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, length, TEXT_DIM, generator=g)
    mask = torch.arange(length)[None, :] < torch.tensor(lens)[:, None]
    return text, mask


# ----------------------------------------------------------------------------- RMSNorm

def test_rms_norm_gives_unit_rms_rows_and_ignores_the_input_scale():
    norm = RMSNorm(DIM, eps=1e-6)
    x = torch.randn(3, 5, DIM) * 7
    out = norm(x)
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(3, 5), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(norm(x * 0.5), out, atol=1e-5, rtol=1e-5)    # eps negligible here
    with torch.no_grad():
        norm.weight.mul_(2)
    torch.testing.assert_close(norm(x), 2 * out)


def test_rms_norm_keeps_the_input_dtype():
    norm = RMSNorm(DIM)
    x = torch.randn(2, DIM).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, norm(x.float()).to(torch.bfloat16))


# ----------------------------------------------------------------------------- self-attention

def test_kv_cache_scale_by_scale_equals_one_block_causal_pass():
    sa = randomised(SelfAttention(DIM, HEADS))
    rope = rope_table(SCHEDULE, DIM // HEADS)
    offsets = scales.token_offsets(SCHEDULE)
    x = torch.randn(2, offsets[-1], DIM)
    with torch.no_grad():
        full = sa(x, rope, attn_mask=block_causal_mask(SCHEDULE))
        cache = KVCache(torch.full((2, HEADS, offsets[-1], DIM // HEADS), float("nan")),
                        torch.full((2, HEADS, offsets[-1], DIM // HEADS), float("nan")))
        parts = []
        for start, end in zip(offsets, offsets[1:]):
            part_rope = (rope[0][start:end], rope[1][start:end])
            parts.append(sa(x[:, start:end], part_rope, kv_cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert not torch.isnan(cache.k).any() and not torch.isnan(cache.v).any()   # every row filled


def test_block_causal_self_attention_never_reads_finer_scales():
    sa = randomised(SelfAttention(DIM, HEADS))
    rope = rope_table(SCHEDULE, DIM // HEADS)
    offsets = scales.token_offsets(SCHEDULE)
    mask = block_causal_mask(SCHEDULE)
    x = torch.randn(1, offsets[-1], DIM)
    changed = x.clone()
    changed[:, offsets[2]:] = torch.randn_like(changed[:, offsets[2]:])   # only the last scale
    with torch.no_grad():
        a, b = sa(x, rope, attn_mask=mask), sa(changed, rope, attn_mask=mask)
    assert torch.equal(a[:, :offsets[2]], b[:, :offsets[2]])
    assert not torch.allclose(a[:, offsets[2]:], b[:, offsets[2]:])


def test_self_attention_temperature_is_clamped_at_log_100():
    assert math.isclose(MAX_SCALE_MUL, math.log(100.0), rel_tol=1e-6)
    sa = randomised(SelfAttention(DIM, HEADS))
    rope = rope_table([(3, 3)], DIM // HEADS)
    x = torch.randn(1, 9, DIM)
    outputs = []
    with torch.no_grad():
        for value in (MAX_SCALE_MUL, MAX_SCALE_MUL + 1, 50.0, 1.0):
            sa.scale_mul_1H11.fill_(value)
            outputs.append(sa(x, rope))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    assert not torch.allclose(outputs[0], outputs[3])


def test_self_attention_keys_carry_no_bias():
    """The k part of the fused qkv bias is a zero buffer, not a parameter: training can never
    move it and it is not in the parameter list."""
    sa = SelfAttention(DIM, HEADS)
    names = dict(sa.named_parameters())
    assert "zero_k_bias" not in names and torch.equal(sa.zero_k_bias, torch.zeros(DIM))
    assert "zero_k_bias" in dict(sa.named_buffers())


def test_self_attention_output_is_per_sample():
    sa = randomised(SelfAttention(DIM, HEADS))
    rope = rope_table(SCHEDULE, DIM // HEADS)
    x = torch.randn(3, 14, DIM)
    with torch.no_grad():
        batched = sa(x, rope)
        single = torch.cat([sa(x[i:i + 1], rope) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- cross-attention

def test_cross_attention_ignores_masked_text_rows():
    ca = randomised(CrossAttention(DIM, TEXT_DIM, HEADS))
    text, mask = text_batch(lens=(6, 3))
    x = torch.randn(2, 5, DIM)
    with torch.no_grad():
        reference = ca(x, *ca.project_kv(text, mask))
        garbage = text.clone()
        garbage[1, 3:] = torch.randn(3, TEXT_DIM) * 100          # padding rows of prompt 1
        assert torch.equal(ca(x, *ca.project_kv(garbage, mask)), reference)
        valid_changed = text.clone()
        valid_changed[1, 0] += 1.0                                # a real row of prompt 1
        moved = ca(x, *ca.project_kv(valid_changed, mask))
    assert torch.equal(moved[0], reference[0])                   # prompt 0 is not affected
    assert not torch.allclose(moved[1], reference[1])


def test_cross_attention_padding_the_text_changes_nothing():
    ca = randomised(CrossAttention(DIM, TEXT_DIM, HEADS))
    text, mask = text_batch(length=4, lens=(4, 2))
    longer = torch.cat([text, torch.randn(2, 5, TEXT_DIM)], 1)
    longer_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.bool)], 1)
    x = torch.randn(2, 7, DIM)
    with torch.no_grad():
        torch.testing.assert_close(ca(x, *ca.project_kv(longer, longer_mask)),
                                   ca(x, *ca.project_kv(text, mask)), atol=1e-6, rtol=1e-5)


def test_project_kv_shapes_and_mask_layout():
    ca = CrossAttention(DIM, TEXT_DIM, HEADS)
    text, mask = text_batch(length=6)
    k, v, key_mask = ca.project_kv(text, mask)
    assert k.shape == v.shape == (2, HEADS, 6, DIM // HEADS)
    assert key_mask.shape == (2, 1, 1, 6) and torch.equal(key_mask[:, 0, 0], mask)


def test_bf16_rounding_rounds_the_attention_in_fp32_and_is_a_no_op_in_bf16():
    plain = randomised(CrossAttention(DIM, TEXT_DIM, HEADS))
    rounding = CrossAttention(DIM, TEXT_DIM, HEADS, bf16_rounding=True)
    rounding.load_state_dict(plain.state_dict())
    text, mask = text_batch()
    q = torch.randn(2, HEADS, 5, DIM // HEADS)
    with torch.no_grad():
        k, v, key_mask = plain.project_kv(text, mask)
        exact, rounded = plain.attend(q, k, v, key_mask), rounding.attend(q, k, v, key_mask)
        assert torch.equal(rounded, rounded.to(torch.bfloat16).float())   # representable in bf16
        assert not torch.equal(rounded, exact)
        torch.testing.assert_close(rounded, exact, atol=0.05, rtol=0.02)
        half = [t.to(torch.bfloat16) for t in (q, k, v)]
        assert torch.equal(rounding.attend(*half, key_mask), plain.attend(*half, key_mask))


# ----------------------------------------------------------------------------- text pooling

def test_text_pool_gives_one_vector_per_prompt_and_ignores_padding():
    pool = randomised(TextPool(DIM, TEXT_DIM, heads=2))
    text, mask = text_batch(lens=(6, 2))
    with torch.no_grad():
        pooled = pool(text, mask)
        garbage = text.clone()
        garbage[1, 2:] = 1e3
        assert pooled.shape == (2, DIM)
        assert torch.equal(pool(garbage, mask), pooled)


def test_text_pool_is_invariant_to_the_order_of_the_text_rows():
    """No positions in the pooling: a permutation of the valid rows pools to the same vector."""
    pool = randomised(TextPool(DIM, TEXT_DIM, heads=2))
    text, mask = text_batch(batch=1, lens=(6,))
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        torch.testing.assert_close(pool(text[:, order], mask), pool(text, mask), atol=1e-6, rtol=1e-5)


def test_pooling_a_single_text_row_does_not_depend_on_the_learned_query():
    """With one valid row every head puts all its weight on it, whatever the query."""
    pool = randomised(TextPool(DIM, TEXT_DIM, heads=2))
    text, mask = text_batch(batch=1, lens=(1,))
    with torch.no_grad():
        before = pool(text, mask)
        pool.ca.mat_q.copy_(torch.randn_like(pool.ca.mat_q) * 10)
        torch.testing.assert_close(pool(text, mask), before, atol=1e-5, rtol=1e-5)
        text_two, mask_two = text_batch(batch=1, lens=(2,))
        moved_q = pool(text_two, mask_two)
        pool.ca.mat_q.copy_(torch.randn_like(pool.ca.mat_q) * 10)
        assert not torch.allclose(pool(text_two, mask_two), moved_q)  # two rows: the query matters


def test_pool_attention_has_a_learned_query_instead_of_a_query_projection():
    pool = PoolAttention(DIM, TEXT_DIM, heads=2)
    assert isinstance(pool.mat_q, torch.nn.Parameter) and pool.mat_q.shape == (1, 2, DIM // 2)
    assert not any(name.startswith("mat_q.") for name, _ in pool.named_parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_layers_run_in_the_weights_dtype(dtype):
    sa = randomised(SelfAttention(DIM, HEADS)).to(dtype)
    ca = randomised(CrossAttention(DIM, TEXT_DIM, HEADS)).to(dtype)
    pool = randomised(TextPool(DIM, TEXT_DIM, 2)).to(dtype)
    text, mask = text_batch()
    text = text.to(dtype)
    x = torch.randn(2, 14, DIM).to(dtype)
    with torch.no_grad():
        out_sa = sa(x, rope_table(SCHEDULE, DIM // HEADS))
        out_ca = ca(x, *ca.project_kv(text, mask))
        out_pool = pool(text, mask)
    for out in (out_sa, out_ca, out_pool):
        assert out.dtype == dtype and torch.isfinite(out.float()).all()
