"""`apply_optim_config`: after a checkpoint is restored, the optimizer and the schedule follow the
configured values (and are left bit for bit as restored when nothing changed)."""
import copy

import torch

from fusedrl.config import TrainConfig
from fusedrl.train.optim import build_optimizer, build_scheduler, lr_factor
from fusedrl.train.resume import apply_optim_config, config_changes, resumable


def _trained(cfg, steps=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.loop.max_steps)
    for _ in range(steps):
        model(torch.randn(4, 5)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return model, optimizer, scheduler


def _restored(cfg, saved_opt, saved_sched, model):
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.loop.max_steps)
    optimizer.load_state_dict(copy.deepcopy(saved_opt))
    scheduler.load_state_dict(copy.deepcopy(saved_sched))
    return optimizer, scheduler


def test_unchanged_config_leaves_the_restored_state_as_is():
    cfg = TrainConfig()
    cfg.optim.lr, cfg.optim.weight_decay, cfg.schedule.warmup_steps, cfg.loop.max_steps = 0.01, 0.05, 2, 10
    model, optimizer, scheduler = _trained(cfg)
    opt2, sched2 = _restored(cfg, optimizer.state_dict(), scheduler.state_dict(), model)
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt2.param_groups])
    apply_optim_config(opt2, sched2, cfg)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt2.param_groups] == groups
    assert sched2.get_last_lr() == scheduler.get_last_lr()


def test_changed_lr_decay_and_adamw_fields_are_in_force_after_restore():
    cfg = TrainConfig()
    cfg.optim.lr, cfg.loop.max_steps = 0.01, 10
    model, optimizer, scheduler = _trained(cfg)
    new = copy.deepcopy(cfg)
    new.optim.lr, new.optim.weight_decay, new.optim.betas, new.optim.eps = 0.5, 0.2, [0.8, 0.9], 1e-6
    new.schedule.decay, new.schedule.min_lr_ratio, new.loop.max_steps = "linear", 0.25, 20
    opt2, sched2 = _restored(new, optimizer.state_dict(), scheduler.state_dict(), model)
    assert opt2.param_groups[0]["lr"] != 0.5 * lr_factor(3, total_steps=20, warmup_steps=0, decay="linear",
                                                         min_lr_ratio=0.25)  # the old values came back
    apply_optim_config(opt2, sched2, new)
    for _ in range(2):
        step = sched2.last_epoch
        expected = 0.5 * lr_factor(step, total_steps=20, warmup_steps=0, decay="linear", min_lr_ratio=0.25)
        assert [g["lr"] for g in opt2.param_groups] == [expected, expected]
        assert sched2.get_last_lr() == [expected, expected]
        model(torch.randn(4, 5)).sum().backward()
        opt2.step()
        opt2.zero_grad()
        sched2.step()
    matrices, vectors = opt2.param_groups
    assert matrices["weight_decay"] == 0.2 and vectors["weight_decay"] == 0.0
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in opt2.param_groups)


def test_which_fields_may_change_on_resume():
    old, new = TrainConfig(), TrainConfig()
    new.optim.lr, new.model.arch = 0.5, {"hidden_size": 8}
    new.data.train, new.loop.max_steps = "other.jsonl", 3
    keys = [key for key, _, _ in config_changes(old, new)]
    assert keys == ["data.train", "loop.max_steps", "model.arch.hidden_size", "optim.lr"]
    assert [resumable(k) for k in keys] == [False, True, False, True]
