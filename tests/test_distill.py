"""Distillation: every KD loss against a direct per-token reference (masked positions, top-k
renormalisation), the frozen teacher, the `self` teacher, and training with KD end to end."""

import math

import pytest
import torch

from forge_qat.data.encode import IGNORE_INDEX
from forge_qat.distill.config import KD_LOSS_NAMES
from forge_qat.distill.objective import KD_LOSSES, kd_loss
from forge_qat.formats.run_dir import checkpoint_dirs

V = 11


def _logits(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6, V, generator=g) * 2


def _probs(row):
    e = [math.exp(x) for x in row]
    return [x / sum(e) for x in e]


def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


def _reference(name, s, t, gold, tau=2.0, k=3):
    """One token, in plain Python from the definitions."""
    s, t = s.tolist(), t.tolist()
    if name == "kl":
        return _kl(_probs(t), _probs(s))
    if name == "rkl":
        return _kl(_probs(s), _probs(t))
    if name == "mse":
        return sum((a - b) ** 2 for a, b in zip(s, t, strict=True)) / len(s)
    if name == "kd":
        return tau * tau * _kl(_probs([x / tau for x in t]), _probs([x / tau for x in s]))
    if name in ("kl-top-k", "rkl-top-k"):
        ranked = t if name == "kl-top-k" else s
        top = sorted(range(len(ranked)), key=lambda i: -ranked[i])[:k]
        pt, ps = _probs([t[i] for i in top]), _probs([s[i] for i in top])
        return _kl(pt, ps) if name == "kl-top-k" else _kl(ps, pt)
    if name == "cakld":
        c = _probs(t)[gold]
        return c * _kl(_probs(s), _probs(t)) + (1 - c) * _kl(_probs(t), _probs(s))
    raise AssertionError(name)


@pytest.mark.parametrize("name", list(KD_LOSSES))
def test_each_kd_loss_matches_its_definition_over_unmasked_positions(name):
    student, teacher = _logits(0), _logits(1)
    labels = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(2))
    labels[0, 3] = labels[1, 1] = labels[1, 5] = IGNORE_INDEX  # prompt tokens / ignored positions
    got = kd_loss(name, student, teacher, labels, temperature=2.0, top_k=3).item()
    pieces = kd_loss(name, student, teacher, labels, temperature=2.0, top_k=3, chunk_tokens=3).item()
    assert pieces == pytest.approx(got, rel=1e-6)
    # position t's logits predict label t + 1
    terms = [_reference(name, student[b, t], teacher[b, t], int(labels[b, t + 1]))
             for b in range(2) for t in range(5) if labels[b, t + 1] != IGNORE_INDEX]
    assert len(terms) == 7
    assert got == pytest.approx(sum(terms) / len(terms), rel=1e-5, abs=1e-6)


def test_kd_gradients_are_the_same_in_pieces():
    student = _logits(0).requires_grad_(True)
    teacher, labels = _logits(1), torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(2))
    grads = []
    for chunk in (1000, 4):
        student.grad = None
        kd_loss("cakld", student, teacher, labels, chunk_tokens=chunk).backward()
        grads.append(student.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_identical_logits_cost_nothing_and_unknown_names_are_refused():
    from forge_qat.errors import ConfigError

    logits, labels = _logits(0), torch.zeros(2, 6, dtype=torch.long)
    for name in KD_LOSSES:
        assert kd_loss(name, logits, logits, labels).item() == pytest.approx(0.0, abs=1e-6), name
    with pytest.raises(ConfigError, match="valid KD loss names: kl, rkl"):
        kd_loss("js", logits, logits, labels)


def test_self_teacher_is_the_fake_quant_off_forward_and_a_frozen_teacher_never_changes():
    import copy

    from forge_qat.distill.objective import Distillation
    from forge_qat.models import preset_model
    from forge_qat.qat.prepare import prepare_qat, set_fake_quant_enabled
    from forge_qat.qat.registry import get_recipe

    model, _ = preset_model("micro-llama")
    teacher = copy.deepcopy(model).requires_grad_(False).eval()
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    prepare_qat(model, get_recipe("int8-dynamic-act-int4-weight"))
    x = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": x, "labels": x, "use_cache": False}
    with torch.no_grad():
        set_fake_quant_enabled(model, False)
        float_logits = model(**batch).logits
        set_fake_quant_enabled(model, True)
        student_logits = model(**batch).logits
    self_kd = Distillation("kl", 0.0, 1.0, 1.0, 50, None)
    loss, parts = self_kd(model, batch)
    assert loss.item() == pytest.approx(kd_loss("kl", student_logits, float_logits, x).item(), rel=1e-5)
    assert parts["kd_loss"] > 0 and "lm_loss" in parts
    # fake quantization is back on after the teacher's pass
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, student_logits)

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    objective = Distillation("cakld", 1.0, 0.5, 1.0, 50, teacher)
    for _ in range(2):
        loss, _ = objective(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(v, frozen[k]) for k, v in teacher.state_dict().items())


def test_training_with_distillation_logs_both_parts_and_refuses_useless_settings(tmp_path, text_file):
    import json

    from conftest import micro_train_args

    from forge_qat.config import TrainConfig
    from forge_qat.errors import ConfigError
    from forge_qat.train.trainer import run_training

    args = micro_train_args(tmp_path / "r", text_file, max_steps=3, kd_weight=0.5, kd_loss="cakld", lm_weight=1.0)
    run_training(TrainConfig.from_flat(**args))
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for r in records:
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.5 * r["kd_loss"], rel=1e-5)
        assert r["kd_loss"] > 0
    for bad, message in (({"kd_loss": "kl"}, "no effect with --kd-weight 0"),
                         ({"kd_weight": 1.0}, "valid KD loss names"),
                         ({"kd_weight": 1.0, "kd_loss": "kl", "qat_recipe": "none"}, "needs a QAT recipe"),
                         ({"lm_weight": 0.0}, "nothing to train on")):
        with pytest.raises(ConfigError, match=message):
            TrainConfig.from_flat(**{**micro_train_args(tmp_path / "x", text_file), **bad})



@pytest.mark.parametrize("teacher", ["float", "self"])
def test_distillation_under_gradient_checkpointing_trains_the_same(tmp_path, text_file, teacher):
    """Activation checkpointing recomputes the student's layers (fake quantizers included) in backward: the
    run's losses, both parts, and final weights equal those of the same run without it."""
    import json

    from conftest import micro_train_args
    from safetensors.torch import load_file

    from forge_qat.config import TrainConfig
    from forge_qat.train.trainer import run_training

    runs = {}
    for gc in (False, True):
        out = tmp_path / f"gc{int(gc)}"
        run_training(TrainConfig.from_flat(**micro_train_args(out, text_file, max_steps=3, save_every=0, kd_weight=0.5,
                                                    kd_loss="kl", kd_teacher=teacher, gradient_checkpointing=gc)))
        runs[gc] = ([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()],
                    load_file(checkpoint_dirs(out)[-1][1] / "model.safetensors"))
    (plain, w_plain), (checkpointed, w_ckpt) = runs[False], runs[True]
    for a, b in zip(plain, checkpointed, strict=True):
        for key in ("loss", "lm_loss", "kd_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (key, a, b)
    for k in w_plain:
        torch.testing.assert_close(w_ckpt[k], w_plain[k], rtol=0, atol=1e-6)


def test_kd_loss_choices_are_the_implemented_losses():
    """The config's choices (torch-free, for the CLI) name exactly the losses distill.py implements."""
    assert tuple(KD_LOSSES) == KD_LOSS_NAMES
