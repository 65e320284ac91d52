import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vare_core.erasure import losses as L
from vare_core.erasure.losses import LN2, LossConfig, erasure_objective


@pytest.fixture(scope="module")
def gold(golden):
    return load_file(str(golden / "svare_losses.safetensors"))


def random_case(B=2, T=7, d=4, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, 2 * d, generator=g) * scale
    teacher = torch.randn(B, T, 2 * d, generator=g) * scale
    labels = torch.randint(0, 2, (B, T, d), generator=g)
    return student, teacher, labels


# ----------------------------------------------------------------------------- golden parity

def test_golden_per_bit_and_per_token_quantities(gold):
    student, labels = gold["student_logits"], gold["bit_labels"]
    bit_ce = L.bit_cross_entropy(student, labels)
    torch.testing.assert_close(bit_ce, gold["bit_ce"], rtol=1e-6, atol=0)
    torch.testing.assert_close(L.bit_error_mask(bit_ce), gold["bit_wrong"], rtol=0, atol=0)
    torch.testing.assert_close(L.token_error_rate(bit_ce), gold["token_error_rate"], rtol=0, atol=0)
    keep = L.token_selection(bit_ce, LN2, 0.25)
    assert keep.dtype == torch.bool
    assert torch.equal(keep.float(), gold["token_keep_mask"])
    assert int(keep.sum()) == 597  # 114 tokens sit exactly at rate 0.25 and must be kept (>=)
    torch.testing.assert_close(L.token_mean_bit_ce(bit_ce), gold["token_mean_bit_ce"],
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(L.token_kl(student, gold["teacher_logits_wo_inf"]), gold["token_kl"],
                               rtol=1e-6, atol=1e-9)


def test_golden_scalar_losses(gold):
    student, teacher, labels = gold["student_logits"], gold["teacher_logits_wo_inf"], gold["bit_labels"]
    fce, stats = L.filtered_ce_loss(student, labels)
    torch.testing.assert_close(fce, gold["L_FCE"], rtol=1e-6, atol=0)
    assert stats["selected_fraction"] == pytest.approx(597 / 1042)
    assert stats["selected_tokens"] == 597
    pre = L.preservation_loss(student, teacher)
    torch.testing.assert_close(pre, gold["L_Pre_without_reg_lambda"], rtol=1e-6, atol=0)
    torch.testing.assert_close(0.5 * pre, gold["L_Pre"], rtol=1e-6, atol=0)
    # the official per-token value is half the per-bit mean KL
    B, T, two_d = student.shape
    p_t = torch.softmax(teacher.view(B, T, -1, 2), -1)
    log_p_s = torch.log_softmax(student.view(B, T, -1, 2), -1)
    per_bit_kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean(-1)
    torch.testing.assert_close(L.token_kl(student, teacher), per_bit_kl / 2, rtol=1e-5, atol=1e-7)


def test_golden_svare_objective_adds_weighted_terms(gold):
    student, teacher, labels = gold["student_logits"], gold["teacher_logits_wo_inf"], gold["bit_labels"]
    loss, stats = erasure_objective("svare", student, student, teacher, labels, LossConfig())
    expected = gold["L_FCE"] + gold["L_Pre"]
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert stats["fce"] == pytest.approx(float(gold["L_FCE"]), rel=1e-6)
    assert stats["pre"] == pytest.approx(float(gold["L_Pre_without_reg_lambda"]), rel=1e-6)
    assert stats["pre_weighted"] == pytest.approx(float(gold["L_Pre"]), rel=1e-6)
    assert stats["loss"] == pytest.approx(float(expected), rel=1e-6)
    assert all(isinstance(v, (float, int)) for v in stats.values())


# ----------------------------------------------------------------------------- gradients

def test_teacher_is_detached_and_student_gets_gradient():
    student, teacher, labels = random_case()
    student_unsafe = student.clone().requires_grad_(True)
    student_safe = (student + 0.3).requires_grad_(True)
    teacher = teacher.clone().requires_grad_(True)
    for method in ("svare", "vare"):
        for t in (student_unsafe, student_safe, teacher):
            t.grad = None
        loss, _ = erasure_objective(method, student_unsafe, student_safe, teacher, labels,
                                    LossConfig())
        loss.backward()
        assert teacher.grad is None, method
        assert student_unsafe.grad is not None and student_unsafe.grad.abs().sum() > 0, method
    # svare: the safe-prompt pass gets gradient only from L_Pre
    assert student_safe.grad is None  # last method was vare: no safe pass
    loss, _ = erasure_objective("svare", student_unsafe, student_safe, teacher, labels, LossConfig())
    loss.backward()
    assert student_safe.grad.abs().sum() > 0


def test_only_selected_tokens_get_fce_gradient():
    student, _, labels = random_case(B=3, T=40, d=8, seed=1)
    student.requires_grad_(True)
    loss, stats = L.filtered_ce_loss(student, labels, LN2, 0.5)
    loss.backward()
    selected = L.token_selection(L.bit_cross_entropy(student, labels), LN2, 0.5)
    assert 0 < int(selected.sum()) < selected.numel()  # the case exercises both kinds
    token_grad = student.grad.abs().sum(-1)
    assert torch.all(token_grad[~selected] == 0)
    assert torch.all(token_grad[selected] > 0)
    assert stats["selected_fraction"] == pytest.approx(float(selected.float().mean()))


def test_fce_gradient_step_reduces_wrong_tokens():
    student, _, labels = random_case(B=2, T=50, d=8, seed=2)
    logits = student.clone().requires_grad_(True)
    opt = torch.optim.SGD([logits], lr=3000.0)  # per-logit grads are ~1/(B*L*d)
    fractions = []
    for _ in range(5):
        loss, stats = L.filtered_ce_loss(logits, labels)
        fractions.append(stats["selected_fraction"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fractions[-1] < 0.5 * fractions[0]


# ----------------------------------------------------------------------------- alpha / gamma semantics

def test_alpha_zero_selects_every_token_and_equals_naive_ce():
    student, _, labels = random_case(B=2, T=30, d=8, seed=3)
    # make some tokens entirely right so "any wrong bit" and "every token" differ
    student = student.view(2, 30, 8, 2).clone()
    student[:, :5] = 0.0
    student[:, :5].scatter_(-1, labels[:, :5].unsqueeze(-1), 5.0)
    student = student.view(2, 30, 16)
    bit_ce = L.bit_cross_entropy(student, labels)
    assert torch.all(L.token_error_rate(bit_ce)[:, :5] == 0)
    assert torch.all(L.token_selection(bit_ce, LN2, 0.0))  # rate >= 0 always holds
    fce, stats = L.filtered_ce_loss(student, labels, alpha=0.0)
    torch.testing.assert_close(fce, L.naive_ce_loss(student, labels))
    assert stats["selected_fraction"] == 1.0
    # alpha = 1: only tokens with every bit wrong
    flipped = 1 - labels
    assert torch.all(L.token_selection(L.bit_cross_entropy(student, flipped), LN2, 1.0)[:, :5])
    assert not torch.any(L.token_selection(bit_ce, LN2, 1.0)[:, :5])


def test_gamma_controls_which_bits_are_wrong():
    logits = torch.tensor([[[0.0, 1.0, 0.0, 3.0]]])  # label 0 for both bits
    labels = torch.zeros(1, 1, 2, dtype=torch.long)
    bit_ce = L.bit_cross_entropy(logits, labels)
    torch.testing.assert_close(bit_ce, torch.tensor([[[math.log1p(math.e), math.log1p(math.e ** 3)]]]))
    assert L.bit_error_mask(bit_ce, LN2).tolist() == [[[1.0, 1.0]]]
    assert L.bit_error_mask(bit_ce, 2.0).tolist() == [[[0.0, 1.0]]]
    assert L.token_error_rate(bit_ce, 2.0).tolist() == [[0.5]]


@pytest.mark.parametrize("kwargs, name", [
    ({"gamma": 0.0}, "gamma"), ({"gamma": -1.0}, "gamma"), ({"gamma": float("nan")}, "gamma"),
    ({"gamma": float("inf")}, "gamma"), ({"alpha": -0.1}, "alpha"), ({"alpha": 1.5}, "alpha"),
    ({"alpha": float("nan")}, "alpha"), ({"alpha": "0.25"}, "alpha"),
])
def test_invalid_gamma_alpha_raise_naming_the_parameter(kwargs, name):
    student, _, labels = random_case()
    with pytest.raises(ValueError, match=name):
        L.filtered_ce_loss(student, labels, **kwargs)
    with pytest.raises(ValueError, match=name):
        LossConfig(**kwargs)
    bit_ce = L.bit_cross_entropy(student, labels)
    with pytest.raises(ValueError, match=name):
        L.token_selection(bit_ce, kwargs.get("gamma", LN2), kwargs.get("alpha", 0.25))


def test_invalid_preservation_weight():
    with pytest.raises(ValueError, match="preservation_weight"):
        LossConfig(preservation_weight=-0.5)
    with pytest.raises(ValueError, match="preservation_weight"):
        LossConfig(preservation_weight=float("nan"))


# ----------------------------------------------------------------------------- precision

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_compute_in_fp32(dtype):
    student, teacher, labels = random_case(B=2, T=64, d=8, seed=4)
    low_s, low_t = student.to(dtype), teacher.to(dtype)
    # exactly the fp32 loss of the rounded logits (math runs in fp32) ...
    for method in ("svare", "vare", "naive"):
        low, _ = erasure_objective(method, low_s, low_s, low_t, labels, LossConfig())
        ref, _ = erasure_objective(method, low_s.float(), low_s.float(), low_t.float(), labels,
                                   LossConfig())
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, ref, rtol=1e-6, atol=0)
    # ... and close to the loss of the unrounded logits
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    for fn in (L.preservation_loss, L.vare_loss):
        torch.testing.assert_close(fn(low_s, low_t), fn(student, teacher), rtol=tol, atol=tol)
    torch.testing.assert_close(L.naive_ce_loss(low_s, labels), L.naive_ce_loss(student, labels),
                               rtol=tol, atol=tol)


def test_fp16_gradients_reach_half_precision_leaf():
    student, teacher, labels = random_case(seed=5)
    leaf = student.half().requires_grad_(True)
    loss, _ = erasure_objective("svare", leaf, leaf, teacher.half(), labels, LossConfig())
    loss.backward()
    assert leaf.grad.dtype == torch.float16 and torch.isfinite(leaf.grad).all()


# ----------------------------------------------------------------------------- token mask

def test_token_mask_excludes_padded_tokens():
    student, teacher, labels = random_case(B=2, T=10, d=4, seed=6)
    lengths = [10, 6]
    mask = torch.zeros(2, 10, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    # garbage in the padding must not matter
    garbage_s, garbage_t = student.clone(), teacher.clone()
    garbage_s[1, 6:] = 1e4
    garbage_t[1, 6:] = -1e4
    pairs = [
        (lambda s, t, m: L.filtered_ce_loss(s, labels, token_mask=m)[0],
         lambda b, n: L.filtered_ce_loss(student[b:b + 1, :n], labels[b:b + 1, :n])[0]),
        (lambda s, t, m: L.preservation_loss(s, t, token_mask=m),
         lambda b, n: L.preservation_loss(student[b:b + 1, :n], teacher[b:b + 1, :n])),
        (lambda s, t, m: L.naive_ce_loss(s, labels, token_mask=m),
         lambda b, n: L.naive_ce_loss(student[b:b + 1, :n], labels[b:b + 1, :n])),
        (lambda s, t, m: L.vare_loss(s, t, token_mask=m),
         lambda b, n: L.vare_loss(student[b:b + 1, :n], teacher[b:b + 1, :n])),
    ]
    for masked, trimmed in pairs:
        expected = torch.stack([trimmed(b, n) for b, n in enumerate(lengths)]).mean()
        torch.testing.assert_close(masked(garbage_s, garbage_t, mask), expected)
        # an all-valid mask is the official (unmasked) formula
        full = torch.ones(2, 10, dtype=torch.bool)
        torch.testing.assert_close(masked(student, teacher, full), masked(student, teacher, None))
    _, stats = L.filtered_ce_loss(garbage_s, labels, token_mask=mask)
    sel = L.token_selection(L.bit_cross_entropy(student, labels))
    assert stats["selected_fraction"] == pytest.approx(float(sel[mask].float().mean()))


def test_token_mask_errors():
    student, teacher, labels = random_case(B=2, T=5)
    with pytest.raises(ValueError, match="token_mask"):
        L.naive_ce_loss(student, labels, token_mask=torch.ones(2, 4))
    empty_row = torch.ones(2, 5)
    empty_row[1] = 0
    with pytest.raises(ValueError, match="no valid tokens"):
        L.preservation_loss(student, teacher, token_mask=empty_row)


# ----------------------------------------------------------------------------- vare / naive / objective

def test_vare_loss_is_mse_of_bit_probabilities():
    student, teacher, _ = random_case(B=2, T=9, d=5, seed=7)
    p_s = torch.softmax(student.view(2, 9, 5, 2), -1)
    p_t = torch.softmax(teacher.view(2, 9, 5, 2), -1)
    torch.testing.assert_close(L.vare_loss(student, teacher), F.mse_loss(p_s, p_t))
    torch.testing.assert_close(L.vare_loss(student, teacher),
                               (p_s[..., 1] - p_t[..., 1]).square().mean())
    assert float(L.vare_loss(teacher, teacher)) == 0.0
    # logits shifted per bit give the same probabilities: zero loss
    assert float(L.vare_loss(teacher + 3.0, teacher)) < 1e-12


def test_naive_ce_is_mean_over_all_bits():
    student, _, labels = random_case(B=2, T=8, d=3, seed=8)
    expected = F.cross_entropy(student.view(-1, 2), labels.reshape(-1))
    torch.testing.assert_close(L.naive_ce_loss(student, labels), expected)


def test_objective_methods_and_stats():
    student, teacher, labels = random_case(B=2, T=12, d=4, seed=9)
    cfg = LossConfig()
    vare, stats = erasure_objective("vare", student, None, teacher, labels, cfg)
    torch.testing.assert_close(vare, L.vare_loss(student, teacher))
    assert set(stats) >= {"loss", "vare", "selected_fraction", "bit_error_rate", "mean_bit_ce"}
    naive, stats = erasure_objective("naive", student, None, None, labels, cfg)
    torch.testing.assert_close(naive, L.naive_ce_loss(student, labels))
    assert stats["naive_ce"] == pytest.approx(stats["mean_bit_ce"])
    # preservation weight 0: the safe pass and the teacher are not needed
    svare, stats = erasure_objective("svare", student, None, None, labels,
                                     LossConfig(preservation_weight=0.0))
    torch.testing.assert_close(svare, L.filtered_ce_loss(student, labels)[0])
    assert stats["pre"] == 0.0
    weighted, _ = erasure_objective("svare", student, student, teacher, labels,
                                    LossConfig(preservation_weight=2.0))
    torch.testing.assert_close(weighted, L.filtered_ce_loss(student, labels)[0]
                               + 2.0 * L.preservation_loss(student, teacher))
    with pytest.raises(ValueError, match="method"):
        erasure_objective("esd", student, student, teacher, labels, cfg)
    with pytest.raises(ValueError, match="teacher_logits"):
        erasure_objective("vare", student, None, None, labels, cfg)
    with pytest.raises(ValueError, match="student_safe_logits"):
        erasure_objective("svare", student, None, teacher, labels, cfg)
    with pytest.raises(ValueError, match="bit_labels"):
        erasure_objective("naive", student, None, None, None, cfg)


def test_shape_and_label_errors():
    student, teacher, labels = random_case(B=2, T=5, d=4)
    with pytest.raises(ValueError, match="bit_labels"):
        L.bit_cross_entropy(student, labels[..., :3])
    with pytest.raises(ValueError, match="0 and 1"):
        L.bit_cross_entropy(student, labels + 1)
    with pytest.raises(ValueError, match="integer"):
        L.bit_cross_entropy(student, labels.float())
    with pytest.raises(ValueError, match="same shape"):
        L.preservation_loss(student, teacher[:, :4])
    with pytest.raises(ValueError, match="even last dim"):
        L.bit_cross_entropy(student[..., :7], labels)


def test_keep_rows_take_part_in_preservation_only():
    from vare_core.erasure.losses import LossConfig, erasure_objective, filtered_ce_loss, preservation_loss
    g = torch.Generator().manual_seed(0)
    unsafe, safe, teacher = (torch.randn(4, 6, 8, generator=g) for _ in range(3))
    labels = torch.randint(0, 2, (4, 6, 4), generator=g)
    config = LossConfig(preservation_weight=0.5)
    rows = torch.tensor([True, False, True, False])
    loss, _ = erasure_objective("svare", unsafe, safe, teacher, labels, config, erase_rows=rows)
    fce_erase, _ = filtered_ce_loss(unsafe[rows], labels[rows], config.gamma, config.alpha)
    expected = fce_erase * 0.5 + 0.5 * preservation_loss(safe, teacher)
    assert torch.allclose(loss, expected)
    # all rows erase: identical to no mask; no rows erase: preservation only, still differentiable
    full, _ = erasure_objective("svare", unsafe, safe, teacher, labels, config)
    same, _ = erasure_objective("svare", unsafe, safe, teacher, labels, config, erase_rows=torch.ones(4, dtype=torch.bool))
    assert torch.equal(full, same)
    student = unsafe.clone().requires_grad_(True)
    keep_only, stats = erasure_objective("svare", student, safe, teacher, labels, config,
                                         erase_rows=torch.zeros(4, dtype=torch.bool))
    assert torch.allclose(keep_only, 0.5 * preservation_loss(safe, teacher)) and stats["fce"] == 0.0
    keep_only.backward()
    assert student.grad is not None and float(student.grad.abs().sum()) == 0.0


def test_erase_token_mask_leaves_masked_tokens_out_of_fce_only():
    torch.manual_seed(0)
    B, L, d = 2, 5, 4
    student, teacher = torch.randn(B, L, 2 * d), torch.randn(B, L, 2 * d)
    labels = torch.randint(0, 2, (B, L, d))
    mask = torch.ones(B, L)
    erase_mask = mask.clone()
    erase_mask[:, 0] = 0
    changed = student.clone()
    changed[:, 0] = 3 * torch.randn(B, 2 * d)   # only the first token differs
    for config in (LossConfig(preservation_weight=0.0), LossConfig(preservation_weight=0.0, erase_target="soft")):
        a, _ = erasure_objective("svare", student, student, teacher, labels, config, token_mask=mask,
                                 erase_token_mask=erase_mask)
        b, _ = erasure_objective("svare", changed, student, teacher, labels, config, token_mask=mask,
                                 erase_token_mask=erase_mask)
        c, _ = erasure_objective("svare", changed, student, teacher, labels, config, token_mask=mask)
        assert torch.allclose(a, b) and not torch.allclose(a, c)
    # L_Pre still sees the first token
    a, _ = erasure_objective("svare", student, student, teacher, labels, LossConfig(), token_mask=mask,
                             erase_token_mask=erase_mask)
    b, _ = erasure_objective("svare", student, changed, teacher, labels, LossConfig(), token_mask=mask,
                             erase_token_mask=erase_mask)
    assert not torch.allclose(a, b)
