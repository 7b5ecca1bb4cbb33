"""Audit of the evaluation CLIs' promise: never a robustness number that is silently wrong, never a traceback.

Each test holds a case the audit found: an attack that cannot move (step 0), AutoAttack on too few
classes, model outputs that are not logits (tuple/dict: a traceback; NaN: counted as class 0;
probabilities; randomized), attack settings whose number means something else (L2 eps in pixel
units, a step above the ball's diameter, targeted PGD's random targets), ``--num-examples`` that
evaluated fewer examples than asked, and ``--valid-labels`` advice.
"""
from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch
from timm.models import register_model
from timm.models._registry import is_model
from torch import nn

import tests.tiny_models  # noqa: F401  (registers tiny_cnn_test)
import train as train_cli
import validate as validate_cli
from src import honesty
from src.attacks import make_attack
from src.bits.device import DeviceEnv
from src.engine import evaluate_loop
from src.errors import UsageError, run_cli
from src.eval_setup import build_eval_attack
from src.sanity import ModelOutputError, probe_model_outputs
from tests.tiny_models import TinyCNN

pytestmark = pytest.mark.usefixtures("single_cpu_thread")

CPU = DeviceEnv(torch.device("cpu"))
NLL = nn.NLLLoss(reduction="sum")


class _Outputs(TinyCNN):
    """TinyCNN whose forward returns something other than plain logits (``kind``)."""

    def __init__(self, kind: str = "logits", **kw):
        super().__init__(**kw)
        self.kind = kind

    def forward(self, x):
        z = super().forward(x)
        if self.kind == "softmax":
            return z.softmax(-1)
        if self.kind == "noisy":
            return z + torch.randn_like(z)
        if self.kind == "tuple":
            return z, z
        if self.kind == "dict":
            return {"logits": z}
        if self.kind == "constant":  # always class 9, whatever the input: no attack can change a prediction
            return z * 0 + torch.linspace(0, 1, z.shape[1], device=z.device)
        return z


class _Quantized(TinyCNN):
    """TinyCNN behind a rounding input step (4 gray levels): its input gradient is exactly zero everywhere."""

    def forward(self, x):
        return super().forward(torch.round(x * 3) / 3)


class _BatchStats(TinyCNN):
    """TinyCNN whose BatchNorm layers always use batch statistics (left in train mode by its forward):
    predictions depend on the other examples of the batch, and running the model changes its buffers."""

    def forward(self, x):
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.train()
        return super().forward(x)


for _name, _cls in (("tiny_cnn_quantized_audit", _Quantized), ("tiny_cnn_batchstats_audit", _BatchStats)):
    if not is_model(_name):
        def _factory(pretrained: bool = False, _c=_cls, **kwargs):
            return _c(**{k: v for k, v in kwargs.items() if k in ("num_classes", "in_chans", "drop_rate")})
        _factory.__name__ = _name
        register_model(_factory)


for _kind in ("softmax", "noisy", "tuple", "constant"):
    if not is_model(f"tiny_cnn_{_kind}_audit"):
        def _factory(pretrained: bool = False, _k: str = _kind, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k in ("num_classes", "in_chans", "drop_rate")}
            return _Outputs(_k, **kwargs)
        _factory.__name__ = f"tiny_cnn_{_kind}_audit"
        register_model(_factory)


@pytest.fixture(scope="module")
def bare_ckpt(tmp_path_factory):
    """Weights of tiny_cnn_test as a bare state dict (the _Outputs variants load them too)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(timm.create_model("tiny_cnn_test", num_classes=10).state_dict(), path)
    return str(path)


def _validate(argv, capsys):
    rc = run_cli(validate_cli.main, list(argv))
    out = capsys.readouterr()
    res = json.loads(out.out.split("--result\n", 1)[1]) if "--result\n" in out.out else None
    return rc, res, out.err


def _tiny(ckpt, model="tiny_cnn_test", *extra):
    return ["--dataset", "digits", "-j", "0", "--log-freq", "0", "--model", model, "--checkpoint", ckpt,
            "--no-normalize", "--num-examples", "50", "-b", "25", *extra]


# ---------------------------------------------------------------------------------------------------------------
# attacks that cannot be what they claim


def test_step_size_zero_is_refused_everywhere(capsys):
    """--attack-lr 0: PGD-k never leaves its random start, a noise baseline reported as PGD-k."""
    with pytest.raises(ValueError, match="never moves from the random start"):
        make_attack("pgd", 8 / 255, 0.0, 10, "linf", (0, 1), criterion=NLL)
    make_attack("pgd", 0.0, 0.0, 10, "linf", (0, 1), criterion=NLL)  # eps 0: nothing to move, allowed
    make_attack("pgd", 8 / 255, 0.0, 0, "linf", (0, 1), criterion=NLL)  # the random start alone, allowed
    rc, _, err = _validate(["--dataset", "digits", "--model", "tiny_cnn_test", "--attack", "pgd", "--attack-lr", "0"],
                           capsys)
    assert rc == 2 and "--attack-lr" in err and "> 0" in err and "Traceback" not in err
    rc = run_cli(train_cli.main, ["--dataset", "digits", "--model", "tiny_cnn_test", "--adv-training", "pgd",
                                  "--attack-lr", "0", "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--attack-lr" in err and "Traceback" not in err


def test_autoattack_with_too_few_classes_is_refused_before_any_batch():
    """pyautoattack's DLR losses need 3 / 4 classes: a ValueError traceback from the first batch before."""
    args = argparse.Namespace(attack="autoattack", attack_eps=8.0, attack_lr=None, attack_norm="linf",
                              attack_boundaries=(0.0, 1.0), verbose=False, seed=0, batch_size=25)
    with pytest.raises(UsageError, match="needs at least 4 classes, the model has 3; use apgd-ce"):
        build_eval_attack(args, 10, 3, CPU)
    build_eval_attack(args, 10, 4, CPU)
    apgd = argparse.Namespace(**{**vars(args), "attack": "apgd-ce"})
    build_eval_attack(apgd, 10, 2, CPU)  # APGD-CE works on two classes
    with pytest.raises(UsageError, match="needs at least 2 classes"):
        build_eval_attack(apgd, 10, 1, CPU)


def test_attack_settings_that_change_what_the_number_means():
    w = honesty.attack_setting_warnings("pgd", "l2", 0.5, None, 10)
    assert len(w) == 1 and "less than one gray level" in w[0] and "127.5" in w[0]
    assert honesty.attack_setting_warnings("pgd", "l2", 127.5, None, 10) == []
    assert honesty.attack_setting_warnings("pgd", "linf", 0.5, None, 10) == []  # a small L-inf eps is fine
    w = honesty.attack_setting_warnings("pgd", "linf", 8, 40, 10)
    assert len(w) == 1 and "diameter" in w[0]
    assert honesty.attack_setting_warnings("pgd", "linf", 8, 2, 10) == []
    assert honesty.attack_setting_warnings("pgd", "linf", 0, 2, 10) == []  # eps 0 of an eps sweep
    w = honesty.attack_setting_warnings("targeted_pgd", "linf", 8, None, 2)
    assert len(w) == 1 and "1 in 2 examples (50%)" in w[0]
    assert honesty.attack_setting_warnings("", "l2", 0.5, 40, 2) == []


def test_l2_eps_in_pixel_units_is_flagged_in_the_results(bare_ckpt, capsys):
    rc, res, _ = _validate(_tiny(bare_ckpt, "tiny_cnn_test", "--attack", "pgd", "--attack-norm", "l2",
                                 "--attack-eps", "0.5", "--attack-steps", "10"), capsys)
    assert rc == 0 and any("less than one gray level" in w for w in res["warnings"])


# ---------------------------------------------------------------------------------------------------------------
# model outputs that are not logits


def test_tuple_and_dict_outputs_are_one_error_line(bare_ckpt, capsys):
    for kind in ("tuple", "dict"):
        data = [(torch.rand(4, 3, 32, 32), torch.arange(4))]
        with pytest.raises(ModelOutputError, match=f"returns a {kind}"):
            evaluate_loop(_Outputs(kind).eval(), data, CPU)
        with pytest.raises(ModelOutputError):
            probe_model_outputs(_Outputs(kind).eval(), (3, 32, 32), 10, "cpu")
    with pytest.raises(ModelOutputError, match="returns 10 logits per example but predicts 7"):
        probe_model_outputs(_Outputs().eval(), (3, 32, 32), 7, "cpu")
    rc, _, err = _validate(_tiny(bare_ckpt, "tiny_cnn_tuple_audit", "--attack", "pgd", "--attack-steps", "1"), capsys)
    assert rc == 2 and "error: the model returns a tuple" in err and "Traceback" not in err


class _NaNForSome(nn.Module):
    """Logits favouring class 1, NaN for the examples whose first pixel is above 0.5."""

    def forward(self, x):
        z = torch.zeros(x.shape[0], 3, device=x.device) + torch.tensor([0.0, 1.0, 0.0]) + 0 * x.mean()
        return torch.where((x[:, 0, 0, 0] > 0.5)[:, None], torch.full_like(z, float("nan")), z)


def test_nan_logits_are_never_counted_correct_and_are_reported():
    x = torch.rand(8, 3, 4, 4)
    x[:4, 0, 0, 0], x[4:, 0, 0, 0] = 0.9, 0.1  # 4 NaN examples, 4 finite ones
    y = torch.zeros(8, dtype=torch.long)  # argmax of a NaN row is class 0: "correct" before the fix
    ev = evaluate_loop(_NaNForSome(), [(x, y)], CPU)
    assert ev.clean_correct1 == 0 and ev.nonfinite_clean == 4 and ev.top1 == 0.0
    y = torch.ones(8, dtype=torch.long)
    ev = evaluate_loop(_NaNForSome(), [(x, y)], CPU)
    assert ev.clean_correct1 == 4  # the finite examples still count
    w = honesty.honesty_warnings([], 8, nonfinite=(ev.nonfinite_clean, 0))
    assert any("NaN/inf logits for 4 clean" in m and "counted as wrong" in m for m in w)


def test_randomized_and_probability_outputs_are_flagged(bare_ckpt, capsys):
    torch.manual_seed(0)
    notes = probe_model_outputs(_Outputs("noisy").eval(), (3, 32, 32), 10, "cpu")
    assert len(notes) == 1 and "randomized" in notes[0]
    notes = probe_model_outputs(_Outputs("softmax").eval(), (3, 32, 32), 10, "cpu")
    assert len(notes) == 1 and "probabilities" in notes[0]
    assert probe_model_outputs(_Outputs().eval(), (3, 32, 32), 10, "cpu") == []
    assert probe_model_outputs(nn.Sequential(_Outputs(), nn.LogSoftmax(-1)).eval(), (3, 32, 32), 10, "cpu") == []
    for kind, what in (("noisy", "randomized"), ("softmax", "probabilities")):
        rc, res, _ = _validate(_tiny(bare_ckpt, f"tiny_cnn_{kind}_audit", "--attack", "pgd", "--attack-steps", "10"),
                               capsys)
        assert rc == 0 and any(what in w for w in res["warnings"]), (kind, res["warnings"])


# ---------------------------------------------------------------------------------------------------------------
# data and labels


def test_fewer_examples_than_asked_are_reported(bare_ckpt, capsys):
    rc, res, _ = _validate(_tiny(bare_ckpt, "tiny_cnn_test") + ["--num-examples", "60"], capsys)
    assert rc == 0 and any("evaluated 50 examples, not the 60" in w and "whole batches" in w
                           for w in res["warnings"])
    rc, res, _ = _validate(_tiny(bare_ckpt, "tiny_cnn_test"), capsys)  # 50 of 50: nothing to say
    assert rc == 0 and res["warnings"] == []
    assert "the data holds fewer" in honesty.example_count_warnings(1000, 297, 100)[0]


def test_valid_labels_that_do_not_cover_the_dataset_name_the_flag(bare_ckpt, capsys, tmp_path):
    labels = tmp_path / "valid.txt"
    labels.write_text("3\n7\n")
    rc, _, err = _validate(_tiny(bare_ckpt, "tiny_cnn_test", "--valid-labels", str(labels)), capsys)
    assert rc == 2 and "--valid-labels" in err and "keeps 2 of the model's outputs" in err


def test_nan_logits_are_not_correct_in_robustbench_and_convergence_either():
    """validate_robustbench's clean pass (robust = AutoAttack AND clean) and attack_convergence's choice of
    correctly classified points have their own loops: argmax of a NaN row is class 0 there too."""
    from src import robustbench
    from src.sanity import predicted_classes

    x = torch.rand(8, 3, 4, 4)
    x[:4, 0, 0, 0], x[4:, 0, 0, 0] = 0.9, 0.1
    y = torch.zeros(8, dtype=torch.long)
    logits = _NaNForSome()(x)
    assert predicted_classes(logits).tolist() == [-1] * 4 + [1] * 4
    assert robustbench._clean_predictions(_NaNForSome(), x, 3, torch.device("cpu")).eq(y).sum() == 0


def test_an_attack_that_changed_no_prediction_is_reported(bare_ckpt, tmp_path, capsys):
    """A model no attack can move (constant logits: also a zero input gradient): robust == clean, and the
    row's warnings say that the attack changed nothing (eps units, step size, gradient masking)."""
    out = tmp_path / "r.json"
    rc, _, err = _validate(_tiny(bare_ckpt, "tiny_cnn_constant_audit", "--attack", "pgd", "--attack-steps", "2",
                                 "--num-examples", "297", "-b", "99", "--results-file", str(out)), capsys)
    assert rc == 0, err
    res = json.loads(out.read_text())
    res = res[0] if isinstance(res, list) else res
    assert res["robust_top1"] == res["top1"] and res["top1"] * 297 / 100 >= 20, res
    assert any("changed no prediction" in w for w in res["warnings"])


# ---------------------------------------------------------------------------------------------------------------
# gradient masking and models whose evaluation is not what it seems


def test_zero_input_gradients_are_reported_for_apgd_ce_too(bare_ckpt, capsys):
    """A quantizing input step gives every example a zero input gradient: APGD-CE cannot move them either,
    and pyautoattack checks zero gradients only for its DLR losses -- APGD-CE's robust accuracy was reported
    with no warning (the check ran for PGD only)."""
    rc, res, err = _validate(_tiny(bare_ckpt, "tiny_cnn_quantized_audit", "--attack", "apgd-ce"), capsys)
    assert rc == 0, err
    assert any("exactly zero input gradient" in w for w in res["warnings"]), res["warnings"]


class _Adaptive(nn.Module):
    """A stateful defense: it counts its forward passes and, from the third on, predicts class 0 for everything."""

    def __init__(self):
        super().__init__()
        self.net = TinyCNN()
        self.register_buffer("calls", torch.zeros(()), persistent=False)

    def forward(self, x):
        self.calls += 1
        return self.net(x) + 100.0 * (self.calls > 2).float() * nn.functional.one_hot(
            torch.zeros(x.shape[0], dtype=torch.long, device=x.device), 10)


class _TestTimeTrained(nn.Module):
    """A defense that trains at test time: every forward moves its last layer's bias towards the classes it saw."""

    def __init__(self):
        super().__init__()
        self.net = TinyCNN()

    def forward(self, x):
        out = self.net(x)
        last = [p for p in self.net.parameters()][-1]
        with torch.no_grad():
            last.add_(0.5 * out.softmax(-1).mean(0))
        return out


def test_a_model_that_changes_its_weights_is_flagged_and_given_back_its_own_weights():
    """The probe put back the buffers of a model that changes its state, not its parameters: a defense that trains
    at test time was then evaluated with weights its four random probe images had moved."""
    model = _TestTimeTrained().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    notes = probe_model_outputs(model, (3, 32, 32), 10, "cpu")
    assert len(notes) == 1 and "changes its own state" in notes[0], notes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_batch_dependent_and_stateful_models_are_flagged(bare_ckpt, capsys):
    """BatchNorm left in train mode (batch statistics, running statistics updated by every forward) passed the
    probe -- the same batch twice gives the same logits -- and validate reported its accuracies (here far from
    the eval-mode ones) with no warning; a defense that changes with the queries it sees did too."""
    notes = probe_model_outputs(_BatchStats().eval(), (3, 32, 32), 10, "cpu")
    assert len(notes) == 2 and "depend on the other examples of the batch" in notes[0], notes
    assert "changes its own state" in notes[1] and "running_mean" in notes[1]
    model = _Adaptive().eval()
    notes = probe_model_outputs(model, (3, 32, 32), 10, "cpu")
    assert len(notes) == 1 and "changes its own state" in notes[0] and "calls" in notes[0], notes
    assert model.calls == 0  # the probe puts the buffers back: the evaluation starts from the model's own state
    net = TinyCNN().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert probe_model_outputs(net, (3, 32, 32), 10, "cpu") == []
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    rc, res, err = _validate(_tiny(bare_ckpt, "tiny_cnn_batchstats_audit", "--attack", "pgd", "--attack-steps", "10"),
                             capsys)
    assert rc == 0, err
    assert any("depend on the other examples of the batch" in w for w in res["warnings"]), res["warnings"]
    assert any("changes its own state" in w for w in res["warnings"]), res["warnings"]


class _LeakyAttack:
    """An attack that claims an L-inf eps of 8/255 but moves every pixel by 0.1 (no projection)."""
    eps, norm = 8 / 255, "linf"

    def __call__(self, model, x, y):
        return (x + 0.1).clamp(0, 1)


def test_adversarial_examples_outside_the_threat_model_are_reported(bare_ckpt, capsys):
    """The crafted examples the robust accuracy is measured on are checked against the attack's eps-ball and
    box. Before, --attack-boundaries narrower than the data clipped every image (PGD-0 'robust' accuracy 18% vs
    clean 75% on a trained model) and the results said only that PGD-0 is '(nearly) the clean accuracy'."""
    torch.manual_seed(0)
    x, y = torch.rand(6, 3, 32, 32) * 0.9, torch.arange(6)
    model = TinyCNN().eval()
    ev = evaluate_loop(model, [(x, y)], CPU, _LeakyAttack())
    assert ev.outside_threat == 6 and ev.threat == ("linf", 8 / 255, (0.0, 1.0))
    for norm, eps in (("linf", 8 / 255), ("l2", 0.5)):  # PGD projects: nothing outside, up to float rounding
        ev = evaluate_loop(model, [(x, y)], CPU, make_attack("pgd", eps, eps / 4, 5, norm, (0, 1), criterion=NLL))
        assert ev.outside_threat == 0 and ev.threat[0] == norm
    w = honesty.threat_model_warnings(6, 6, ("linf", 8 / 255, (0.0, 1.0)))
    assert len(w) == 1 and "6 of the 6 adversarial examples lie outside" in w[0] and "8/255 in L-inf" in w[0]
    rc, res, err = _validate(_tiny(bare_ckpt, "tiny_cnn_test", "--attack", "pgd", "--attack-steps", "0",
                                   "--attack-boundaries", "0", "0.5"), capsys)
    assert rc == 0, err
    assert any("50 of the 50 adversarial examples lie outside" in w and "[0, 0.5]" in w for w in res["warnings"])
    rc, res, _ = _validate(_tiny(bare_ckpt, "tiny_cnn_test", "--attack", "pgd", "--attack-steps", "2"), capsys)
    assert rc == 0 and not any("outside the attack's threat model" in w for w in res["warnings"])
