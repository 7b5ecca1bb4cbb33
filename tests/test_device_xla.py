"""The XLA device layer and launch_xla.py without torch_xla: a fake torch_xla stands in for it.

The fake runs everything on the CPU and records what the layer asks of torch_xla (graph cuts,
gradient all-reduces, parameter broadcasts, loader wrapping). Its collectives behave as if the
other replicas contributed zeros, so one process can play replica 0 of a larger world. The real
torch_xla runs in the `make test-xla` lane (tests/test_xla_lane.py).
"""
from __future__ import annotations

import logging
import os
import sys
import types
from collections import namedtuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import launch_xla
from src.bits import device_xla
from src.bits.device import DeviceEnv, initialize_device, tree_to_cpu
from src.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeXla:
    """What the layer uses of torch_xla, recording each call."""

    REDUCE_SUM = "sum"
    REDUCE_MAX = "max"

    def __init__(self, world_size: int = 1, rank: int = 0):
        self.world, self.rank = world_size, rank
        self.syncs = 0
        self.reduced_grads = 0
        self.all_reduces = []
        self.spawned = []

    # torch_xla
    def device(self):
        return torch.device("cpu")

    def sync(self):
        self.syncs += 1

    # torch_xla.core.xla_model
    def all_reduce(self, op, inputs, scale=1.0):
        self.all_reduces.append((op, len(inputs), scale))
        for t in inputs:
            if scale != 1.0:
                t.mul_(scale)

    def reduce_gradients(self, optimizer):
        self.reduced_grads += 1

    # torch_xla.runtime
    def world_size(self):
        return self.world

    def global_ordinal(self):
        return self.rank

    def local_ordinal(self):
        return self.rank

    def device_type(self):
        return "CPU"

    # torch_xla.distributed.xla_multiprocessing
    def spawn(self, fn, args=(), nprocs=None):
        self.spawned.append((fn, args, nprocs))


class FakeMpDeviceLoader:
    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __iter__(self):
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)


@pytest.fixture
def fake_xla(monkeypatch):
    """Install a fake torch_xla (world size 1 unless a test changes ``fake.world``/``fake.rank``)."""
    fake = FakeXla()
    mods = {
        "torch_xla": types.ModuleType("torch_xla"),
        "torch_xla.core": types.ModuleType("torch_xla.core"),
        "torch_xla.core.xla_model": types.ModuleType("torch_xla.core.xla_model"),
        "torch_xla.runtime": types.ModuleType("torch_xla.runtime"),
        "torch_xla.distributed": types.ModuleType("torch_xla.distributed"),
        "torch_xla.distributed.parallel_loader": types.ModuleType("torch_xla.distributed.parallel_loader"),
        "torch_xla.distributed.xla_multiprocessing": types.ModuleType("torch_xla.distributed.xla_multiprocessing"),
    }
    txla, xm, xr = mods["torch_xla"], mods["torch_xla.core.xla_model"], mods["torch_xla.runtime"]
    txla.device, txla.sync, txla.runtime = fake.device, fake.sync, xr
    txla.core, txla.distributed = mods["torch_xla.core"], mods["torch_xla.distributed"]
    mods["torch_xla.core"].xla_model = xm
    for name in ("REDUCE_SUM", "REDUCE_MAX", "all_reduce", "reduce_gradients"):
        setattr(xm, name, getattr(fake, name))
    for name in ("world_size", "global_ordinal", "local_ordinal", "device_type"):
        setattr(xr, name, getattr(fake, name))
    mods["torch_xla.distributed.parallel_loader"].MpDeviceLoader = FakeMpDeviceLoader
    mods["torch_xla.distributed.xla_multiprocessing"].spawn = fake.spawn
    mods["torch_xla.distributed"].parallel_loader = mods["torch_xla.distributed.parallel_loader"]
    mods["torch_xla.distributed"].xla_multiprocessing = mods["torch_xla.distributed.xla_multiprocessing"]
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    monkeypatch.setattr(F, "batch_norm", F.batch_norm)  # undo install_eval_batch_norm after the test
    return fake


@pytest.fixture
def no_torch_xla(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_xla", None)  # `import torch_xla` raises ImportError
    for name in [n for n in sys.modules if n.startswith("torch_xla.")]:
        monkeypatch.delitem(sys.modules, name)


# -- the device environment ---------------------------------------------------------------------

def test_pjrt_device_selects_the_xla_env_with_ordinals_from_the_runtime(fake_xla):
    fake_xla.world, fake_xla.rank = 4, 2
    env = initialize_device(amp=True)
    assert isinstance(env, device_xla.XlaDeviceEnv)
    assert (env.world_size, env.global_rank, env.local_rank) == (4, 2, 2)
    assert env.distributed and not env.primary
    assert env.amp_dtype == torch.bfloat16 and env.create_grad_scaler() is None


def test_force_cpu_wins_over_pjrt_device(fake_xla):
    env = initialize_device(force_cpu=True)
    assert type(env) is DeviceEnv and env.type == "cpu"


def test_float16_autocast_is_refused_on_xla(fake_xla):
    with pytest.raises(UsageError, match="bfloat16"):
        initialize_device(amp=True, amp_dtype="float16")


def test_missing_torch_xla_is_a_clear_usage_error(no_torch_xla, monkeypatch):
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    with pytest.raises(UsageError, match="requirements-tpu.txt"):
        initialize_device()


def test_collectives_cut_the_graph_and_are_skipped_for_one_replica(fake_xla):
    env = initialize_device()
    t = torch.ones(3)
    env.all_reduce_(t, "mean")
    env.reduce_gradients(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1))
    env.distribute_bn(nn.BatchNorm1d(3), reduce=True)
    env.barrier()
    assert fake_xla.all_reduces == [] and fake_xla.reduced_grads == 0 and fake_xla.syncs == 0
    assert env.broadcast_object({"a": 1}) == {"a": 1} and env.all_gather_object(5) == [5]

    fake_xla.world = 2
    env = initialize_device()
    env.all_reduce_(t, "mean")
    assert fake_xla.all_reduces == [("sum", 1, 0.5)] and torch.equal(t, torch.full((3,), 0.5))
    env.reduce_gradients(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1))
    assert fake_xla.reduced_grads == 1
    assert fake_xla.syncs == 2  # every collective is followed by a graph cut (compiled under the lock)


def test_objects_travel_through_tensor_all_reduces(fake_xla):
    fake_xla.world = 3  # the fake's other replicas contribute zeros: replica 0's row survives
    env = initialize_device()
    out = env.broadcast_object(("/tmp/run-1", True))
    assert out == ("/tmp/run-1", True)
    assert [op for op, _, _ in fake_xla.all_reduces] == ["sum", "sum"]


def test_distribute_bn_reduces_only_running_statistics(fake_xla):
    fake_xla.world = 2
    env = initialize_device()
    bn = nn.BatchNorm2d(4)
    env.distribute_bn(bn, reduce=True)
    assert fake_xla.all_reduces == [("sum", 2, 0.5)]  # running_mean and running_var, averaged
    fake_xla.rank = 1
    env = initialize_device()
    bn.running_var.fill_(3.0)
    env.distribute_bn(bn, reduce=False)  # broadcast: non-primary replicas contribute zeros
    assert torch.equal(bn.running_var, torch.zeros(4))


def test_model_parameters_start_from_the_primary(fake_xla):
    env = initialize_device()
    env.to_model_device(nn.Linear(2, 2))
    assert fake_xla.all_reduces == []
    fake_xla.world, fake_xla.rank = 2, 1
    env = initialize_device()
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    assert env.wrap_distributed(env.to_model_device(model)) is model  # no DDP on XLA
    # one all-reduce of parameters and buffers; the non-primary contributes zeros
    assert fake_xla.all_reduces == [("sum", 7, 1.0)] and fake_xla.syncs == 1
    assert all(not t.any() for t in model.state_dict().values())


def test_mp_loader_wraps_only_when_asked_and_only_on_xla(fake_xla):
    loader = [(torch.zeros(1), torch.zeros(1))]
    env = initialize_device()
    assert env.wrap_loader(loader, mp_loader=False) is loader
    wrapped = env.wrap_loader(loader, mp_loader=True)
    assert isinstance(wrapped, FakeMpDeviceLoader) and wrapped.loader is loader
    assert DeviceEnv(device=torch.device("cpu")).wrap_loader(loader, mp_loader=True) is loader


def test_autoattack_on_xla_warns(fake_xla, caplog):
    env = initialize_device()
    with caplog.at_level(logging.WARNING, logger="robust_vits"):
        env.warn_unsuited_attack("pgd")
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
        env.warn_unsuited_attack("autoattack")
        DeviceEnv(device=torch.device("cpu")).warn_unsuited_attack("autoattack")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unreasonably long" in warnings[0].getMessage()


def test_eval_batch_norm_matches_torch_values_and_input_gradients():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        bn.weight.normal_(), bn.bias.normal_()
    bn.eval()
    x = torch.randn(3, 5, 4, 4, requires_grad=True)
    ref = bn(x)
    g_ref, = torch.autograd.grad(ref.square().sum(), x)
    out = device_xla.eval_batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    g, = torch.autograd.grad(out.square().sum(), x)
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(g, g_ref, atol=1e-4)
    x1 = torch.randn(6, 5)
    assert torch.allclose(device_xla.eval_batch_norm(x1, bn.running_mean, bn.running_var, None, None, 1e-5),
                          F.batch_norm(x1, bn.running_mean, bn.running_var, training=False), atol=1e-5)


def test_batch_norm_patch_leaves_non_xla_tensors_alone(monkeypatch):
    monkeypatch.setattr(F, "batch_norm", F.batch_norm)
    calls = []
    original = F.batch_norm

    def spy(*a, **k):
        calls.append(a)
        return original(*a, **k)

    monkeypatch.setattr(F, "batch_norm", spy)
    device_xla.install_eval_batch_norm()
    device_xla.install_eval_batch_norm()  # idempotent: one wrapper
    patched = F.batch_norm
    assert patched is not spy and getattr(patched, "_xla_eval_patch", False)
    nn.BatchNorm2d(2).eval()(torch.randn(1, 2, 3, 3))
    assert len(calls) == 1  # CPU tensors went to the original function


def test_checkpoint_trees_hold_cpu_tensors_and_keep_their_structure():
    Pair = namedtuple("Pair", "a b")
    t = torch.arange(3.0)
    tree = {"model": {"w": t}, "opt": [{"state": (t, 1)}], "p": Pair(1, 2), "s": "x"}
    out = tree_to_cpu(tree)
    assert out["p"] == Pair(1, 2) and out["s"] == "x" and isinstance(out["opt"][0]["state"], tuple)
    assert out["model"]["w"].device.type == "cpu"
    assert out["model"]["w"].data_ptr() == t.data_ptr()  # CPU tensors are not copied


# -- the training loop on the (fake) XLA environment ---------------------------------------------

ADV_TRAIN = ["--model", "tiny_cnn_test", "--epochs", "1", "--adv-training", "pgd", "--attack", "pgd",
             "--attack-eps", "8", "--attack-steps", "2", "--eps-schedule", "constant", "--eval-metric", "robust_top1"]


def _train(tmp_path, tiny_train_args, extra=()):
    import tests.tiny_models  # noqa: F401  registers tiny_cnn_test
    from tests.conftest import run_train

    argv = [a for a in tiny_train_args] + ADV_TRAIN + ["--output", str(tmp_path), "--experiment", "x"] + list(extra)
    return run_train(argv)


def test_training_on_xla_cuts_graphs_reduces_gradients_and_writes_cpu_checkpoints(
        fake_xla, tmp_path, tiny_train_args, monkeypatch):
    from src import setup_task

    fake_xla.world = 2
    created = []
    real_loss = setup_task.create_train_loss
    monkeypatch.setattr(setup_task, "create_train_loss", lambda *a, **k: created.append(real_loss(*a, **k))
                        or created[-1])
    res = _train(tmp_path, tiny_train_args, ["--use-mp-loader"])
    ckpt = torch.load(os.path.join(res["output_dir"], "last.pth.tar"), map_location="meta", weights_only=True)
    steps = ckpt["step_count_global"]
    assert steps > 0 and fake_xla.reduced_grads == steps  # one gradient all-reduce per optimizer step
    # per training step: 2 PGD steps + the step itself + the all-reduce; per eval batch: 2 PGD + 1
    assert fake_xla.syncs >= steps * 4
    assert created[0].eval_mode  # --attack-mode defaults to eval on XLA too


def test_attack_mode_train_is_available_on_xla(fake_xla, tmp_path, tiny_train_args, monkeypatch):
    from src import setup_task

    created = []
    real_loss = setup_task.create_train_loss
    monkeypatch.setattr(setup_task, "create_train_loss", lambda *a, **k: created.append(real_loss(*a, **k))
                        or created[-1])
    res = _train(tmp_path, tiny_train_args, ["--attack-mode", "train"])
    assert not created[0].eval_mode and res["eval"]["robust_top1"] >= 0


# -- launch_xla.py ---------------------------------------------------------------------------------

def test_launch_without_torch_xla_says_what_to_install(no_torch_xla, capsys):
    assert launch_xla.main(["train.py", "--help"]) == 2
    assert "requirements-tpu.txt" in capsys.readouterr().err


def test_launch_refuses_scripts_without_mp_entry_and_missing_scripts(fake_xla, tmp_path, capsys):
    plain = tmp_path / "plain.py"
    plain.write_text("X = 1\n")
    assert launch_xla.main([str(plain)]) == 2
    assert "has no _mp_entry" in capsys.readouterr().err
    assert launch_xla.main([str(tmp_path / "nope.py")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert launch_xla.main([str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    assert launch_xla.main([str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "SyntaxError" in err and "\n" not in err and "Traceback" not in err
    assert launch_xla.main(["--num-devices", "0", os.path.join(ROOT, "train.py")]) == 2
    capsys.readouterr()
    assert launch_xla.main(["--num-devices", "abc", os.path.join(ROOT, "train.py")]) == 2
    assert launch_xla.main([]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(ln.startswith("error: launch_xla.py: ") for ln in err), err  # no usage block
    assert "invalid int value: 'abc'" in err[0]
    assert fake_xla.spawned == []


@pytest.mark.parametrize("n, nprocs", [(1, 1), (8, None)])
def test_launch_uses_the_nprocs_torch_xla_2_accepts(fake_xla, monkeypatch, n, nprocs):
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    for script in ("train.py", "validate.py", "attack_effectiveness.py"):
        path = os.path.join(ROOT, script)
        assert launch_xla.main(["--num-devices", str(n), path, "--epochs", "3"]) == 0
        fn, args, got = fake_xla.spawned[-1]
        assert fn is launch_xla.run_replica and got == nprocs
        assert args == (path, ["--epochs", "3"], n)


def test_launch_on_the_cpu_backend_runs_one_device(fake_xla, monkeypatch, capsys):
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    monkeypatch.setenv("CPU_NUM_DEVICES", "4")
    train = os.path.join(ROOT, "train.py")
    assert launch_xla.main(["--num-devices", "2", train]) == 2
    assert "#9089" in capsys.readouterr().err and fake_xla.spawned == []
    assert launch_xla.main([train]) == 0
    assert os.environ["CPU_NUM_DEVICES"] == "1" and fake_xla.spawned[-1][2] == 1


def test_replica_checks_the_device_count_then_runs_the_entry_point(fake_xla, tmp_path, capsys, monkeypatch):
    script = tmp_path / "entry.py"
    script.write_text("import sys\n\ndef _mp_entry(index):\n    sys.exit(10 + index + len(sys.argv))\n")
    fake_xla.world = 2
    with pytest.raises(SystemExit) as e:
        launch_xla.run_replica(0, str(script), ["a"], num_devices=4)
    assert e.value.code == 2 and "pass --num-devices 1 or 2" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(SystemExit) as e:
        launch_xla.run_replica(1, str(script), ["a", "b"], num_devices=2)
    assert e.value.code == 14  # index 1 + argv [script, a, b]
