"""The training loop's mechanics on small problems: learning-rate schedules against their formulas,
gradient accumulation against one large batch, AMP paths, InfoNCE against a brute-force
reference, per-group learning rates in the logs, the task protocol, and the interrupt checkpoint.

(End-to-end stage runs, resume after SIGKILL and DDP are in test_train.py; weight-decay groups in
test_optimizer.py.)
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detailfusion.errors import ConfigError
from detailfusion.params import repo_section
from detailfusion.train import loop as loop_module
from detailfusion.train.config import LoopConfig
from detailfusion.train.data import StepSampler, Triplets
from detailfusion.train.loop import (
    autocast_for,
    build_optimizer,
    build_scheduler,
    cpu_prefers_onednn_fp32,
    freeze_untrained,
    load_checkpoint,
    matmul_precision,
    resolve_amp,
    run_training,
    train_step,
)
from detailfusion.train.tasks import (
    BranchFinetuneTask,
    DetailPretrainTask,
    FusionTask,
    LoopTask,
    TargetBank,
    info_nce,
    param_groups,
)


class RegressionTask(nn.Module):
    """A task with a per-sample loss (MSE), so accumulated micro-batches equal one large batch
    (the real tasks' InfoNCE uses in-batch negatives, whose set depends on the batch size)."""

    name = "regression"

    def __init__(self, n: int = 32, batch_size: int = 16, seed: int = 0, init_seed: int | None = None):
        super().__init__()
        torch.manual_seed(seed if init_seed is None else init_seed)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = torch.randn(n, 2, generator=g)
        self.sampler = StepSampler(np.full(n, -1), batch_size, seed)
        self.forward_dtypes: list[torch.dtype] = []

    def batch(self, step, micro, n_micro, rank, world):
        rows = torch.as_tensor(self.sampler.micro_batch(step, micro, n_micro, rank, world))
        return {"x": self.x[rows], "y": self.y[rows]}

    def forward(self, batch):
        pred = self.model(batch["x"])
        self.forward_dtypes.append(pred.dtype)
        loss = F.mse_loss(pred.float(), batch["y"])
        return {"loss": loss, "abs_err": (pred.float() - batch["y"]).abs().mean().detach()}

    def optimizer_groups(self, lr, lr_backbone, weight_decay):
        body = list(self.model[0].named_parameters(prefix="model.0"))
        head = list(self.model[2].named_parameters(prefix="model.2"))
        return param_groups({"body": (body, lr_backbone), "head": (head, lr)}, weight_decay)


def _cfg(**kw) -> LoopConfig:
    base = dict(max_steps=4, batch_size=16, lr=1e-2, lr_backbone=1e-3, warmup_steps=1, device="cpu",
                checkpoint_every=100, log_every=1, amp="off")
    # the other settings (optimiser, schedule, seed) as params.yaml has them
    return replace(repo_section("stage1_detail").loop, **{**base, **kw})


def _params(task: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in task.model.state_dict().items()}


# --------------------------------------------------------------------------- task protocol


def _tiny_triplets(n: int = 8) -> Triplets:
    return Triplets(query_ids=[str(i) for i in range(n)], ref=np.arange(n), target=np.arange(n)[::-1].copy(),
                    captions=[["make it red"]] * n, texts=["make it red"] * n, group=np.full(n, -1),
                    negatives=np.full((n, 4), -1), dataset="cirr")  # fmt: skip


def test_every_task_meets_the_loop_protocol(tmp_path):
    from detailfusion.models import create_model

    model = create_model("tiny", variant="full")
    trip = _tiny_triplets()
    pixels = np.zeros((8, model.image_size, model.image_size, 3), dtype=np.uint8)
    sampler = StepSampler(trip.group, 4, 0)
    tasks = [
        DetailPretrainTask(model, trip, pixels, sampler, 0),
        BranchFinetuneTask(model, trip, pixels, sampler, 0),
        FusionTask(model, {"target": torch.zeros(8, 4)}, sampler, 0),
        RegressionTask(),
    ]
    for task in tasks:
        assert isinstance(task, LoopTask), type(task).__name__
        groups = task.optimizer_groups(1e-3, 1e-4, 0.05)
        names = [g["name"] for g in groups]
        assert len(set(names)) == len(names)
        assert [g["name"] for g in build_optimizer(groups, _cfg()).param_groups] == names

    plain = nn.Linear(2, 2)
    assert not isinstance(plain, LoopTask)
    with pytest.raises(TypeError, match="Linear is not a training task"):
        run_training(plain, _cfg(), tmp_path)


def test_forward_without_loss_is_named():
    class NoLoss(RegressionTask):
        def forward(self, batch):
            return {"abs_err": super().forward(batch)["abs_err"]}

    task = NoLoss()
    cfg = _cfg()
    opt = build_optimizer(task.optimizer_groups(cfg.lr, cfg.lr_backbone, cfg.weight_decay), cfg)
    with pytest.raises(KeyError, match="task regression: forward returned \\['abs_err'\\], without the 'loss'"):
        train_step(task, opt, build_scheduler(opt, cfg), cfg, 0, device=torch.device("cpu"))


# --------------------------------------------------------------------------- optimiser


def test_freeze_untrained_is_explicit_and_build_optimizer_keeps_groups():
    task = RegressionTask()
    cfg = _cfg(beta1=0.8, beta2=0.95)
    head_only = [g for g in task.optimizer_groups(cfg.lr, cfg.lr_backbone, cfg.weight_decay)
                 if g["name"].startswith("head")]  # fmt: skip
    opt = build_optimizer(head_only, cfg)
    assert all(p.requires_grad for p in task.parameters())  # building the optimiser froze nothing
    assert freeze_untrained(task, head_only) == ["model.0.weight", "model.0.bias"]
    assert [n for n, p in task.named_parameters() if p.requires_grad] == ["model.2.weight", "model.2.bias"]
    assert [(g["name"], g["lr"], g["weight_decay"], g["betas"]) for g in opt.param_groups] == [
        ("head", 1e-2, 0.05, (0.8, 0.95)), ("head.no_decay", 1e-2, 0.0, (0.8, 0.95))]
    # frozen parameters stay out of the task's groups (param_groups keeps trainable ones only)
    assert [g["name"] for g in task.optimizer_groups(cfg.lr, cfg.lr_backbone, cfg.weight_decay)] == [
        "head", "head.no_decay"]
    assert freeze_untrained(task, [{"params": list(task.parameters())}]) == []
    assert all(p.requires_grad for p in task.parameters())

    w, b = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))
    assert [g["name"] for g in build_optimizer([{"params": [w]}, {"params": [b]}], cfg).param_groups] == [
        "group0", "group1"]
    with pytest.raises(ValueError, match="unique"):
        build_optimizer([{"params": [w], "name": "a"}, {"params": [b], "name": "a"}], cfg)


def test_a_module_at_learning_rate_zero_is_frozen_and_stays_out_of_the_clipping(tmp_path):
    """lr_backbone 0 (stage 1's frozen backbone) must train the head exactly as a task that left
    the body out by hand: the body gets no group, no gradient and no share of the clipping norm
    (a group at lr 0 kept its weights bitwise but its gradients shrank the head's clipped step)."""

    class HeadOnly(RegressionTask):
        def optimizer_groups(self, lr, lr_backbone, weight_decay):
            return param_groups({"head": (list(self.model[2].named_parameters(prefix="model.2")), lr)}, weight_decay)

    cfg = _cfg(lr_backbone=0.0, grad_clip=0.05, max_steps=6)
    task, by_hand = RegressionTask(), HeadOnly()
    body_before = {k: v for k, v in _params(task).items() if k.startswith("0.")}
    assert [g["name"] for g in task.optimizer_groups(cfg.lr, cfg.lr_backbone, cfg.weight_decay)] == [
        "head", "head.no_decay"]
    run_training(task, cfg, tmp_path / "zero")
    run_training(by_hand, cfg, tmp_path / "by_hand")
    after, want = _params(task), _params(by_hand)
    assert all(torch.equal(after[k], v) for k, v in body_before.items())  # the body did not move
    assert all(p.grad is None and not p.requires_grad for p in task.model[0].parameters())
    assert all(torch.equal(after[k], want[k]) for k in after)  # the head trained as with the body left out
    assert not torch.equal(after["2.weight"], _params(RegressionTask())["2.weight"])  # it trained


def test_fused_adamw_follows_the_per_parameter_loop():
    """build_optimizer uses the fused update on the CPU: the same AdamW as the per-parameter loop
    (decay and no-decay groups, two learning rates, warm-up/cosine schedule, clipping), equal to
    float rounding but not bitwise (tensors large enough for vectorised kernels); parameters on a
    device without a fused kernel get the foreach update."""
    cfg = _cfg(max_steps=6, grad_clip=0.5)
    runs = []
    for make in (lambda groups: build_optimizer(groups, cfg),
                 lambda groups: torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2), foreach=False)):
        torch.manual_seed(0)
        body = nn.Linear(129, 257)
        head = nn.Embedding(1000, 64)
        groups = param_groups({"body": (list(body.named_parameters()), cfg.lr_backbone),
                               "head": (list(head.named_parameters(prefix="embedding")), cfg.lr)}, cfg.weight_decay)
        params = [p for g in groups for p in g["params"]]
        opt = make(groups)
        sched = build_scheduler(opt, cfg)
        g = torch.Generator().manual_seed(1)
        for _ in range(cfg.max_steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
        runs.append((opt.defaults, [p.detach().clone() for p in params]))
    (defaults, got), (_, want) = runs
    assert defaults["fused"] is True and not defaults["foreach"]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(got, want, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(got, want, strict=True))  # other kernels: other roundings
    torch.manual_seed(0)
    assert not torch.allclose(got[0], nn.Linear(129, 257).weight)  # it trained

    meta = nn.Linear(4, 4, device="meta")  # a device without a fused AdamW kernel
    opt = build_optimizer([{"params": list(meta.parameters()), "lr": 1e-3, "weight_decay": 0.0}], cfg)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]


# --------------------------------------------------------------------------- schedules


def _lrs_per_step(cfg: LoopConfig, base_lrs: list[float]) -> list[list[float]]:
    """The lr each group trains with at steps 0 .. max_steps-1."""
    params = [nn.Parameter(torch.zeros(1)) for _ in base_lrs]
    groups = [{"params": [p], "lr": lr, "name": f"g{i}"} for i, (p, lr) in enumerate(zip(params, base_lrs, strict=True))]
    opt = build_optimizer(groups, cfg)
    sched = build_scheduler(opt, cfg)
    out = []
    for _ in range(cfg.max_steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize(("max_steps", "warmup", "min_ratio"), [(10, 3, 0.1), (7, 0, 0.0), (5, 5, 0.5)])
def test_warmup_cosine_schedule_matches_the_formula(max_steps, warmup, min_ratio):
    cfg = _cfg(max_steps=max_steps, warmup_steps=warmup, min_lr_ratio=min_ratio, schedule="cosine")
    base = [1e-3, 2e-5]
    for s, lrs in enumerate(_lrs_per_step(cfg, base)):
        if s < warmup:
            factor = (s + 1) / warmup
        else:
            progress = min(1.0, (s - warmup) / max(1, max_steps - warmup))
            factor = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        assert lrs == pytest.approx([b * factor for b in base], rel=1e-12), s
    if warmup < max_steps:  # the first step after warm-up trains at the full rate
        assert _lrs_per_step(cfg, base)[warmup] == pytest.approx(base, rel=1e-12)


def test_constant_schedule_after_warmup():
    lrs = _lrs_per_step(_cfg(max_steps=6, warmup_steps=2, schedule="constant"), [1e-3])
    assert [x[0] for x in lrs] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3], rel=1e-12)


@pytest.mark.parametrize(("max_steps", "warmup"), [(20, 6), (10, 2), (100, 0), (3, 1)])
def test_onecycle_schedule_matches_the_formula(max_steps, warmup):
    ratio = 0.1
    cfg = _cfg(max_steps=max_steps, warmup_steps=warmup, min_lr_ratio=ratio, schedule="onecycle")
    base = [1e-3, 4e-5]
    pct = min(0.5, max(warmup / max_steps, 0.01))
    if pct * max_steps <= 1:  # the warm-up lasts at least part of a step
        pct = 1.5 / max_steps
    up_end = pct * max_steps - 1  # the step at which the peak is reached

    def cos_anneal(start, end, p):
        return end + (start - end) / 2 * (1 + math.cos(math.pi * p))

    lrs = _lrs_per_step(cfg, base)
    for s, got in enumerate(lrs):
        want = []
        for b in base:
            if s <= up_end:
                want.append(cos_anneal(b / 10, b, s / up_end))
            else:
                want.append(cos_anneal(b, b * ratio, (s - up_end) / (max_steps - 1 - up_end)))
        assert got == pytest.approx(want, rel=1e-9), s
    assert lrs[0] == pytest.approx([b / 10 for b in base], rel=1e-9)  # starts at lr / 10
    assert lrs[-1] == pytest.approx([b * ratio for b in base], rel=1e-9)  # ends at lr * min_lr_ratio
    if up_end == int(up_end):
        assert lrs[int(up_end)] == pytest.approx(base, rel=1e-9)  # peaks at each group's lr


# --------------------------------------------------------------------------- accumulation and AMP


def _grads_at_each_step(task: RegressionTask, cfg: LoopConfig, steps: int) -> list[list[torch.Tensor]]:
    """Run ``steps`` train_steps; the gradients the optimiser stepped with (after clipping)."""
    groups = task.optimizer_groups(cfg.lr, cfg.lr_backbone, cfg.weight_decay)
    freeze_untrained(task, groups)
    opt = build_optimizer(groups, cfg)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append([p.grad.clone() for g in o.param_groups
                                                            for p in g["params"]]))  # fmt: skip
    sched = build_scheduler(opt, cfg)
    for step in range(steps):
        train_step(task, opt, sched, cfg, step, device=torch.device("cpu"))
    return seen


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_gradient_accumulation_equals_one_large_batch(clip):
    big, acc = RegressionTask(), RegressionTask()
    g_big = _grads_at_each_step(big, _cfg(grad_accum=1, grad_clip=clip), 3)
    g_acc = _grads_at_each_step(acc, _cfg(grad_accum=4, grad_clip=clip), 3)
    for a, b in zip(g_big, g_acc, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-7)
    for k, v in _params(big).items():
        torch.testing.assert_close(_params(acc)[k], v, rtol=1e-5, atol=1e-6)

    if not clip:  # the first step's gradient is that of the batch's mean loss, by autograd
        ref = RegressionTask()
        rows = torch.as_tensor(ref.sampler.batch(0))
        loss = F.mse_loss(ref.model(ref.x[rows]), ref.y[rows])
        params = [p for g in ref.optimizer_groups(1.0, 1.0, 0.0) for p in g["params"]]
        for want, got in zip(torch.autograd.grad(loss, params), g_acc[0], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_accumulated_run_matches_large_batch_run_end_to_end(tmp_path):
    big, acc = RegressionTask(), RegressionTask()
    s_big = run_training(big, _cfg(grad_accum=1), tmp_path / "big", progress=False)
    s_acc = run_training(acc, _cfg(grad_accum=4), tmp_path / "acc", progress=False)
    assert s_big["samples"] == s_acc["samples"] == 4 * 16
    assert s_acc["final_loss"] == pytest.approx(s_big["final_loss"], rel=1e-5)
    for k, v in _params(big).items():
        torch.testing.assert_close(_params(acc)[k], v, rtol=1e-5, atol=1e-6)
    assert len(acc.forward_dtypes) == 4 * len(big.forward_dtypes)


def test_bf16_autocast_on_cpu():
    cpu = torch.device("cpu")
    ctx, scaler = autocast_for(cpu, "auto")
    assert scaler is None and not isinstance(ctx, torch.autocast)  # auto = fp32 on CPU
    task = RegressionTask()
    cfg = _cfg(amp="bf16")
    ctx, scaler = autocast_for(cpu, cfg.amp)
    assert isinstance(ctx, torch.autocast) and scaler is None  # bf16 needs no loss scaling
    opt = build_optimizer(task.optimizer_groups(cfg.lr, cfg.lr_backbone, cfg.weight_decay), cfg)
    before = _params(task)
    logs, samples = train_step(task, opt, build_scheduler(opt, cfg), cfg, 0, device=cpu, autocast=ctx)
    assert task.forward_dtypes == [torch.bfloat16]
    assert samples == 16 and math.isfinite(logs["loss"]) and logs["loss"] > 0
    after = _params(task)
    assert all(v.dtype == torch.float32 for v in after.values())  # master weights stay fp32
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_cpu_bf16_detection_reads_the_cpu_flags():
    zen5 = "processor : 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n"
    assert cpu_prefers_onednn_fp32(zen5)  # oneDNN keeps fp32 kernels there, faster than the BLAS's
    # with AMX oneDNN would compute in bf16: auto keeps fp32
    assert not cpu_prefers_onednn_fp32("flags : fpu avx512f avx512_bf16 amx_tile amx_bf16 amx_int8\n")
    assert not cpu_prefers_onednn_fp32("flags : fpu sse2 avx2 avx512f avx512bw\n")  # not measured: fp32
    assert not cpu_prefers_onednn_fp32("")
    assert not cpu_prefers_onednn_fp32("model name : x\nbf16_flags : avx512_bf16\n")  # only the flags line


def test_resolve_amp_picks_the_devices_format(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_amp(cuda, "auto") == "bf16"
    monkeypatch.setattr(loop_module, "cpu_prefers_onednn_fp32", lambda: True)
    assert resolve_amp(cpu, "auto") == "matmul-bf16"
    monkeypatch.setattr(loop_module, "cpu_prefers_onednn_fp32", lambda: False)
    assert resolve_amp(cpu, "auto") == "off"
    for amp in ("off", "bf16", "fp16", "matmul-bf16"):
        assert resolve_amp(cpu, amp) == amp  # an explicit format is kept
    with pytest.raises(ConfigError, match="loop.amp: matmul-bf16 is a CPU format"):  # one line from the CLI
        resolve_amp(cuda, "matmul-bf16")
    ctx, scaler = autocast_for(cpu, "matmul-bf16")
    assert scaler is None and not isinstance(ctx, torch.autocast)  # fp32 tensors: no autocast


def _mkldnn_precisions() -> tuple[str, str]:
    return torch.backends.mkldnn.matmul.fp32_precision, torch.backends.mkldnn.conv.fp32_precision


def test_matmul_precision_sets_and_restores_the_settings():
    before = _mkldnn_precisions()
    with matmul_precision("off"):
        assert _mkldnn_precisions() == before  # every other format leaves them alone
    with matmul_precision("matmul-bf16"):
        assert _mkldnn_precisions() == ("bf16", "bf16")
    assert _mkldnn_precisions() == before
    with pytest.raises(RuntimeError, match="boom"):
        with matmul_precision("matmul-bf16"):
            raise RuntimeError("boom")
    assert _mkldnn_precisions() == before  # restored on an error too


def test_matmul_bf16_sends_matrix_products_to_onednn(capfd):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1088, 128, generator=g), torch.randn(128, 384, generator=g)  # a stage-2 product
    verbose = torch.backends.mkldnn.VERBOSE_ON
    with torch.backends.mkldnn.verbose(verbose):
        exact = a @ b
    assert "exec,cpu,matmul" not in capfd.readouterr().out  # fp32 products go to the BLAS
    with matmul_precision("matmul-bf16"):
        with torch.backends.mkldnn.verbose(verbose):
            fast = a @ b
    out = capfd.readouterr().out
    assert "exec,cpu,matmul" in out and "attr-fpmath:bf16" in out  # oneDNN, bf16 math permitted
    assert fast.dtype == torch.float32
    # within bf16 rounding of the inputs (on a CPU without AMX oneDNN keeps fp32 kernels: closer still)
    torch.testing.assert_close(fast, exact, rtol=2e-2, atol=0.1)


def test_run_training_records_and_scopes_the_format(tmp_path):
    before = _mkldnn_precisions()
    runs = {amp: RegressionTask() for amp in ("off", "matmul-bf16")}
    summaries = {amp: run_training(t, _cfg(amp=amp), tmp_path / amp, progress=False) for amp, t in runs.items()}
    assert summaries["off"]["amp"] == "off" and summaries["matmul-bf16"]["amp"] == "matmul-bf16"
    assert _mkldnn_precisions() == before  # evaluation after the loop runs in full fp32
    for amp in runs:
        assert math.isfinite(summaries[amp]["final_loss"])
        assert all(v.dtype == torch.float32 for v in _params(runs[amp]).values())
    for k, v in _params(runs["matmul-bf16"]).items():  # the same training
        torch.testing.assert_close(v, _params(runs["off"])[k], rtol=2e-2, atol=2e-3)
    auto = run_training(RegressionTask(), _cfg(amp="auto"), tmp_path / "auto", progress=False)
    assert auto["amp"] == ("matmul-bf16" if cpu_prefers_onednn_fp32() else "off")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 + GradScaler needs CUDA")
def test_fp16_with_grad_scaler_on_cuda():
    dev = torch.device("cuda")
    task = RegressionTask().to(dev)
    cfg = _cfg(amp="fp16", device="cuda")
    ctx, scaler = autocast_for(dev, cfg.amp)
    assert isinstance(scaler, torch.amp.GradScaler)
    opt = build_optimizer(task.optimizer_groups(cfg.lr, cfg.lr_backbone, cfg.weight_decay), cfg)
    sched = build_scheduler(opt, cfg)
    before = _params(task)
    for step in range(3):
        logs, _ = train_step(task, opt, sched, cfg, step, device=dev, autocast=ctx, scaler=scaler)
        assert math.isfinite(logs["loss"])
    assert set(task.forward_dtypes) == {torch.float16}
    assert scaler.get_scale() > 0
    after = _params(task)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------- InfoNCE


def _info_nce_loops(q: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, extra: torch.Tensor | None,
                    bank: torch.Tensor | None = None, bank_mask: torch.Tensor | None = None):
    """InfoNCE written out: for query i, the logits against every target j, against each of its
    own extra negatives that is not an all-zero row and against each bank entry its mask keeps;
    loss_i = logsumexp - logit_ii."""
    losses = []
    for i in range(q.shape[0]):
        logits = [scale * sum(q[i, d] * t[j, d] for d in range(q.shape[1])) for j in range(t.shape[0])]
        if extra is not None:
            for m in range(extra.shape[1]):
                if any(float(extra[i, m, d]) != 0 for d in range(extra.shape[2])):
                    logits.append(scale * sum(q[i, d] * extra[i, m, d] for d in range(q.shape[1])))
        if bank is not None:
            for k in range(bank.shape[0]):
                if not bool(bank_mask[i, k]):
                    logits.append(scale * sum(q[i, d] * bank[k, d] for d in range(q.shape[1])))
        losses.append(torch.log(sum(torch.exp(x) for x in logits)) - logits[i])
    return sum(losses) / len(losses)


@pytest.mark.parametrize("with_extra,with_bank", [(False, False), (True, False), (False, True), (True, True)])
def test_info_nce_matches_a_brute_force_reference(with_extra, with_bank):
    g = torch.Generator().manual_seed(0)
    b, d, m, k = 5, 6, 3, 7
    q = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    t = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(4.0, dtype=torch.float64)
    extra = bank = bank_mask = None
    if with_extra:
        extra = F.normalize(torch.randn(b, m, d, generator=g, dtype=torch.float64), dim=-1)
        extra[1, 2] = 0  # a missing set member
        extra[3] = 0  # a query with no extra negative at all
    if with_bank:
        bank = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=-1)
        bank_mask = torch.rand(b, k, generator=g) < 0.3
        bank_mask[2] = True  # a query for which no entry is a negative
    got = info_nce(q, t, scale, extra, bank, bank_mask)
    (grad_got,) = torch.autograd.grad(got, q)
    want = _info_nce_loops(q, t, scale, extra, bank, bank_mask)
    (grad_want,) = torch.autograd.grad(want, q)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)  # info_nce's logits go through fp32
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-5, atol=1e-6)
    if with_extra:  # extra negatives make the task harder
        assert got.item() > info_nce(q, t, scale).item()
        empty = torch.zeros(b, 0, d, dtype=torch.float64)
        assert info_nce(q, t, scale, empty).item() == info_nce(q, t, scale).item()
    if with_bank:
        assert got.item() > info_nce(q, t, scale, extra).item()
        nothing = torch.ones(b, k, dtype=torch.bool)  # every entry masked = no bank
        assert info_nce(q, t, scale, extra, bank, nothing).item() == info_nce(q, t, scale, extra).item()


# --------------------------------------------------------------------------- stage 2's target bank


def test_target_bank_is_first_in_first_out_and_masks_the_query_own_images():
    bank = TargetBank(4)
    assert bank.negatives(torch.tensor([0]), torch.tensor([1])) == (None, None) and len(bank) == 0
    emb = torch.eye(6)[:, :3]  # row r: a recognisable vector (rows 3..5 are zero)
    bank.push(emb[:3], torch.tensor([10, 11, 12]))
    got, mask = bank.negatives(torch.tensor([11, 20]), torch.tensor([12, 21]))
    assert got.shape == (4, 3) and len(bank) == 3
    # query 0: its target 11 and reference 12 are no negatives; the empty fourth slot neither
    assert mask.tolist() == [[False, True, True, True], [False, False, False, True]]
    bank.push(emb[3:5] + 1, torch.tensor([13, 14]))  # wraps: 14 overwrites the oldest (10)
    assert bank.index.tolist() == [14, 11, 12, 13] and bank.ptr == 1
    torch.testing.assert_close(bank.emb[0], emb[4] + 1)
    bank.push(torch.arange(18.0).view(6, 3), torch.arange(100, 106))  # more than it holds: the last 4
    assert sorted(bank.index.tolist()) == [102, 103, 104, 105] and len(bank) == 4
    restored = TargetBank(4)
    restored.load_state(bank.state())
    assert torch.equal(restored.emb, bank.emb) and torch.equal(restored.index, bank.index)
    assert restored.ptr == bank.ptr
    with pytest.raises(ValueError, match="target bank of 4 entries, bank_size is 8"):
        TargetBank(8).load_state(bank.state())
    with pytest.raises(ValueError, match="bank_size: must be >= 0"):
        TargetBank(-1)
    off = TargetBank(0)
    off.push(emb, torch.arange(6))
    assert off.negatives(torch.tensor([0]), torch.tensor([1])) == (None, None)


def test_target_bank_keeps_the_reference_a_negative_when_the_ranking_keeps_it():
    """FashionIQ's ranking keeps the reference image in the gallery, so the bank must not mask it
    (only the query's own target); CIRR's drops it, and so does the bank."""
    emb = torch.eye(3)
    fiq, cirr = TargetBank(3, mask_reference=False), TargetBank(3)
    for bank in (fiq, cirr):
        bank.push(emb, torch.tensor([10, 11, 12]))
    target, reference = torch.tensor([11]), torch.tensor([12])
    assert fiq.negatives(target, reference)[1].tolist() == [[False, True, False]]
    assert cirr.negatives(target, reference)[1].tolist() == [[False, True, True]]


def _bank_on_rank(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        bank = TargetBank(6)
        bank.push(torch.full((2, 3), float(rank)), torch.tensor([10 * rank, 10 * rank + 1]))
        torch.save(bank.state(), f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_target_bank_gathers_every_rank_targets_under_ddp(tmp_path):
    torch.multiprocessing.spawn(_bank_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for state in states:  # both ranks hold both ranks' targets, in rank order
        assert state["index"].tolist() == [0, 1, 10, 11, -1, -1] and state["ptr"] == 4
        assert state["emb"][:4, 0].tolist() == [0.0, 0.0, 1.0, 1.0]


def _stage2_task(bank_size: int, init_seed: int = 0):
    from detailfusion.models import create_model

    torch.manual_seed(init_seed)
    model = create_model("tiny", variant="full")
    n = 24
    trip = _tiny_triplets(n)
    pixels = np.random.default_rng(0).integers(0, 256, (n, model.image_size, model.image_size, 3), dtype=np.uint8)
    return BranchFinetuneTask(model, trip, pixels, StepSampler(trip.group, 4, 0), 0, hard_negatives=0,
                              bank_size=bank_size)


def test_stage2_bank_adds_earlier_targets_as_negatives_and_resumes_exactly(tmp_path):
    cfg = _cfg(max_steps=5, batch_size=4)
    plain = _stage2_task(0)
    run_training(plain, cfg, tmp_path / "plain", progress=False)
    ref = _stage2_task(8)
    ref_summary = run_training(ref, cfg, tmp_path / "ref", progress=False)
    assert len(ref.bank) == 8 and ref.bank.ptr == (5 * 4) % 8
    # the first step has an empty bank (same loss as without one); later steps see 4 or 8 more negatives
    assert not all(torch.equal(a, b) for a, b in zip(_params(plain).values(), _params(ref).values(), strict=True))

    def stop_after_step_3(step, logs):
        if step == 3:
            raise KeyboardInterrupt

    task = _stage2_task(8)
    with pytest.raises(KeyboardInterrupt):
        run_training(task, cfg, tmp_path / "run", on_log=stop_after_step_3, progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 3 and state["task_state"]["bank"]["index"].ge(0).sum() == 8
    resumed = _stage2_task(8, init_seed=5)  # other weights, empty bank: all comes from the checkpoint
    summary = run_training(resumed, cfg, tmp_path / "run", progress=False)
    assert summary["resumed_from"] == 3
    assert {k: summary[k] for k in summary if k.startswith("final_")} == {
        k: ref_summary[k] for k in ref_summary if k.startswith("final_")}
    want = _params(ref)
    assert all(torch.equal(v, want[k]) for k, v in _params(resumed).items())
    assert torch.equal(resumed.bank.emb, ref.bank.emb) and torch.equal(resumed.bank.index, ref.bank.index)

    # a checkpoint written without the bank (older code, or bank_size 0) is refused, not half-restored
    other = tmp_path / "other"
    run_training(_stage2_task(0), _cfg(max_steps=2, batch_size=4), other, progress=False)
    torch.save({k: v for k, v in torch.load(other / "checkpoints" / "last.pt", weights_only=True).items()
                if k != "task_state"}, other / "checkpoints" / "last.pt")
    with pytest.raises(RuntimeError, match="lacks the task's own state"):
        run_training(_stage2_task(8), cfg, other, progress=False)


# --------------------------------------------------------------------------- logs and interrupts


def test_learning_rate_is_logged_per_parameter_group(tmp_path):
    from mlflow.utils.validation import _validate_metric_name

    from detailfusion.tracking import mlflow_key

    task = RegressionTask()
    cfg = _cfg(max_steps=5, warmup_steps=2, min_lr_ratio=0.2, log_every=2)
    logged = []
    run_training(task, cfg, tmp_path, on_log=lambda step, logs: logged.append((step, logs)), progress=False)
    names = ["body", "body.no_decay", "head", "head.no_decay"]
    base = {"body": cfg.lr_backbone, "head": cfg.lr}
    assert [s for s, _ in logged] == [2, 4, 5]  # every log_every steps and at the end
    for step, logs in logged:
        assert "lr" not in logs
        assert sorted(k for k in logs if k.startswith("lr/")) == [f"lr/{n}" for n in names]
        progress = (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)
        factor = 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))  # lr of the next step
        for n in names:
            assert logs[f"lr/{n}"] == pytest.approx(base[n.split(".")[0]] * factor, rel=1e-12)
        assert {"loss", "abs_err", "samples_per_s"} <= set(logs)
        for key in logs:  # the CLI logs them to MLflow as train/<key>, unchanged by the key cleaner
            assert mlflow_key(f"train/{key}") == f"train/{key}"
            _validate_metric_name(f"train/{key}")


def test_interrupt_checkpoints_the_completed_steps_and_resume_matches(tmp_path):
    ref = RegressionTask()
    ref_summary = run_training(ref, _cfg(max_steps=5), tmp_path / "ref", progress=False)

    def stop_after_step_3(step, logs):
        if step == 3:
            raise KeyboardInterrupt

    task = RegressionTask()
    with pytest.raises(KeyboardInterrupt):
        run_training(task, _cfg(max_steps=5), tmp_path / "run", on_log=stop_after_step_3, progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 3  # three steps were taken

    resumed = RegressionTask(init_seed=7)  # other initial weights: all state comes from the checkpoint
    summary = run_training(resumed, _cfg(max_steps=5), tmp_path / "run", progress=False)
    assert summary["resumed_from"] == 3
    # the summary's results (sample count, final_* means over the last steps) are the uninterrupted run's
    results = {k: v for k, v in summary.items() if k not in ("resumed_from", "seconds", "samples_per_s")}
    assert results == {k: v for k, v in ref_summary.items() if k in results} and summary["samples"] == 5 * 16
    want = _params(ref)
    assert all(torch.equal(v, want[k]) for k, v in _params(resumed).items())
