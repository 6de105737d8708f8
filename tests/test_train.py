"""The trainer's own pieces: config overrides, packing, checkpoints, metrics log truncation on resume."""

import json
from pathlib import Path

import pytest
import torch

from qlfast import config
from qlfast.trainer import checkpoint, optim
from qlfast.trainer.logger import MetricsLogger


def test_overrides_parse_by_declared_type():
    cfg = config.from_args(["--rl.lr=3e-5", "--rl.group_size=4", "--model.checkpointing=true", "--rl.tis_cap=none",
                            "--rl.phases=100:10:2,200:20:3", "--train.name=x"])
    assert cfg.rl.lr == 3e-5 and isinstance(cfg.rl.group_size, int) and cfg.rl.group_size == 4
    assert cfg.model.checkpointing is True and cfg.rl.tis_cap is None and cfg.train.name == "x"
    phases = [(p.max_prompt_tokens, p.max_response_tokens, p.steps) for p in cfg.rl.phases]
    assert phases == [(100, 10, 2), (200, 20, 3)]


@pytest.mark.parametrize("arg, msg", [
    ("--rl.nope=1", "unknown field 'nope'"),
    ("--nosection.x=1", "unknown section"),
    ("--rl.group_size=four", "expected int"),
    ("--model.checkpointing=maybe", "expected bool"),
    ("--rl.phases=100:10", "max_prompt:max_response:steps"),
    ("--rl.lr", "overrides are --section.key=value"),
    ("--model.sp_attention=hybrid", "needs --model.sp_ulysses=U dividing"),
    ("--model.sp_attention=zigzag", "--model.sp_attention=zigzag: must be one of ring, ulysses, hybrid"),
])
def test_bad_overrides_name_the_problem(arg, msg, capsys):
    with pytest.raises(SystemExit):
        config.from_args([arg])
    assert msg in capsys.readouterr().err


def test_presets_build_and_differ():
    assert set(config.PRESETS) >= {"tiny", "qwenlong-l1-32b", "qwen-7b"}
    big = config.from_args(["--preset", "qwenlong-l1-32b"])
    # the public recipe's values
    assert (big.rl.group_size, big.rl.batch_size, big.rl.mini_batch_size, big.rl.lr) == (8, 128, 32, 2e-6)
    assert (big.rl.temperature, big.rl.top_p, big.rl.overlong_window, big.rl.max_gen_rounds) == (0.7, 0.95, 1000, 10)
    assert [p.max_prompt_tokens for p in big.rl.phases] == [20480, 61440]
    # a 32B policy is sharded (FSDP2) and its 60K-token groups split over a node (Ulysses keeps the shared prompt)
    assert big.model.fsdp and big.model.sp == 8 and big.model.sp_attention == "ulysses"
    assert 40 % big.model.sp == 0 and 8 % big.model.sp == 0  # DeepSeek-R1-Distill-Qwen-32B's 40 / 8 heads
    seven = config.from_args(["--preset", "qwen-7b"])
    assert 28 % seven.model.sp == 0 and 4 % seven.model.sp == 0  # 7B: 28 / 4 heads


def test_checkpoint_is_atomic_and_latest_is_complete(tmp_path):
    def save_model(d):
        import os

        os.makedirs(d)
        open(os.path.join(d, "config.json"), "w").write("{}")

    checkpoint.save(tmp_path, "a", save_model=save_model, state={"step": 1}, trainer_state={"x": torch.ones(2)})
    checkpoint.save(tmp_path, "b", save_model=save_model, state={"step": 2}, trainer_state={"x": torch.zeros(2)})
    path = checkpoint.latest(tmp_path)
    assert path.name == "b"
    state, trainer = checkpoint.load(path)
    assert state["step"] == 2 and trainer["x"].tolist() == [0, 0]
    # a half-written checkpoint (crash before the rename) is never LATEST
    (tmp_path / "checkpoints" / "c.tmp").mkdir()
    assert checkpoint.latest(tmp_path).name == "b"


def test_sharded_checkpoint_leaves_an_unstepped_optimizer_alone(tmp_path):
    """DCP's get_optimizer_state_dict creates missing optimizer state with a zero-gradient step(), which AdamW counts:
    the first real update then takes step-2 bias corrections and moves 0.744x as far (this was the FSDP run's 25%
    policy_loss gap from the "sft" checkpoint on). Saving must leave a fresh optimizer fresh, resuming from it must
    take the same first step, and a stepped optimizer must round-trip."""

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        return model, optim.adamw(model, lr=1e-2)

    def step(model, opt):
        for p in model.parameters():
            p.grad = torch.linspace(-1, 1, p.numel()).view_as(p)
        opt.step()
        opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    model, opt = fresh()
    checkpoint.save_sharded(tmp_path / "fresh", model, opt)
    assert not opt.state
    expected = step(*fresh())
    resumed, resumed_opt = fresh()
    checkpoint.load_sharded(tmp_path / "fresh", resumed, resumed_opt)
    assert not resumed_opt.state
    assert all(torch.equal(a, b) for a, b in zip(step(resumed, resumed_opt), expected))

    step(model, opt)
    checkpoint.save_sharded(tmp_path / "stepped", model, opt)
    other, other_opt = fresh()
    checkpoint.load_sharded(tmp_path / "stepped", other, other_opt)
    assert float(other_opt.state[other.weight]["step"]) == 1.0
    assert all(torch.equal(a, b) for a, b in zip(step(other, other_opt), step(model, opt)))


def test_sharded_checkpoint_holds_every_optimizer(tmp_path):
    """Both optimizers of a run (RL, then SFT) go into dcp/: an SFT optimizer that has stepped round-trips next to an
    RL optimizer that has not (under FSDP2 a resume during SFT otherwise restarts Adam's moments)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    rl_opt, sft_opt = optim.adamw(model, lr=1e-2), optim.adamw(model, lr=1e-2)
    for p in model.parameters():
        p.grad = torch.linspace(-1, 1, p.numel()).view_as(p)
    sft_opt.step()
    checkpoint.save_sharded(tmp_path / "c", model, rl_opt, sft_opt)
    other = torch.nn.Linear(8, 4)
    other_rl, other_sft = optim.adamw(other, lr=1e-2), optim.adamw(other, lr=1e-2)
    checkpoint.load_sharded(tmp_path / "c", other, other_rl, other_sft)
    assert not other_rl.state and float(other_sft.state[other.weight]["step"]) == 1.0
    assert torch.equal(other_sft.state[other.weight]["exp_avg_sq"], sft_opt.state[model.weight]["exp_avg_sq"])
    assert torch.equal(other.weight, model.weight)


def test_rng_state_round_trip():
    s = checkpoint.rng_state()
    a = torch.rand(3)
    checkpoint.set_rng_state(s)
    assert torch.equal(torch.rand(3), a)


def test_metrics_truncate_after_resume_step(tmp_path):
    log = MetricsLogger(tmp_path, is_main=True, total_steps=4)
    for step in range(5):  # SFT steps 0..4 finished before RL started: all of them stay
        log.log(step, {"sft_loss": 1.0 / (step + 1)}, stream="sft")
    for step in range(4):
        log.log(step, {"reward_mean": float(step)})
    log.log(2, {"accuracy": 0.5, "stage": "after phase 1"}, stream="eval")
    log.close()
    log = MetricsLogger(tmp_path, is_main=True, total_steps=4)
    log.truncate_after(2, 5)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stream"], r["step"]) for r in rows] == [("sft", s) for s in range(5)] + [
        ("train", 0), ("train", 1), ("eval", 2)]
    log.log(0, {"accuracy": 0.4, "stage": "after SFT"}, stream="eval")
    log.truncate_after(0, 5, evaluated=set())  # the "sft" checkpoint, taken before the evaluation that followed it
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stream"], r["step"]) for r in rows] == [("sft", s) for s in range(5)]  # it runs again: no duplicate
    log.truncate_after(0, 3)  # a checkpoint taken mid-SFT, after 3 SFT steps
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stream"], r["step"]) for r in rows] == [("sft", 0), ("sft", 1), ("sft", 2)]
    log.close()


def test_each_stage_has_its_own_progress_bar_started_by_its_first_row(tmp_path):
    log = MetricsLogger(tmp_path, is_main=True, total_steps=6, sft_steps=3)
    assert log.bar is None  # nothing made before a stage starts (the RL bar used to tick its clock through SFT)
    for step in range(3):
        log.log(step, {"sft_loss": 1.0}, stream="sft")
    assert (log.bar.desc, log.bar.n, log.bar.total) == ("SFT", 3, 3)
    sft_bar = log.bar
    log.log(2, {"reward_mean": 0.5})  # RL resumed at step 2
    assert log.bar is not sft_bar and (log.bar.desc, log.bar.n, log.bar.total) == ("RL", 3, 6)
    assert log.bar.initial == 2  # its rate counts the steps run since it started, not the resumed ones
    log.close()


def test_bad_data_file_stops_with_file_row_field(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"document": "The vault code of Kestrel House is 4.", "question": "What is the vault code of '
                   'Kestrel House?", "answer": "4"}\n{"document": "x", "answer": "3"}\n')
    proc = subprocess.run([sys.executable, "-m", "qlfast.train", f"--train.out_dir={tmp_path}",
                           f"--data.train_files={bad}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"{bad}: row 2: field 'question" in proc.stderr and "Traceback" not in proc.stderr


def test_sft_data_is_apart_from_rl_data(tmp_path):
    """Synthetic SFT questions come from their own seed (RL trains on prompts SFT never showed); --sft.data_files
    loads worked responses from a file."""
    from qlfast.trainer import build

    cfg = config.from_args(["--data.synthetic_train=40", "--data.synthetic_sft=30", "--data.synthetic_eval=8"])
    tokenizer, _ = build.tokenizer_and_model(cfg, torch.device("cpu"))
    ds = build.datasets(cfg, tokenizer, list(cfg.rl.phases))
    assert len(ds.sft) == len(ds.sft_prompt_ids) == 30 and len(ds.train) == 40
    assert all("reasoning" in ex.extra for ex in ds.sft)
    rl_docs = {(ex.document, ex.question) for ex in ds.train}
    assert not rl_docs & {(ex.document, ex.question) for ex in ds.sft}
    assert not {ex.uid for ex in ds.train} & {ex.uid for ex in ds.sft}

    rows = tmp_path / "sft.jsonl"
    rows.write_text(json.dumps({"document": "The vault code of Kestrel House is 4.", "question": "What is the vault "
                                "code of Kestrel House?", "answer": "4",
                                "reasoning": "<think>Kestrel House: 4.</think> Therefore, the answer is 4"}) + "\n")
    cfg = config.from_args(["--data.synthetic_train=40", "--data.synthetic_eval=8", f"--sft.data_files={rows}"])
    ds = build.datasets(cfg, tokenizer, list(cfg.rl.phases))
    assert len(ds.sft) == 1 and ds.sft[0].extra["reasoning"].startswith("<think>")
    assert tokenizer.decode(ds.sft_prompt_ids[0]).count("Kestrel House") == 2  # document and question


def test_an_exception_closes_the_engine_logger_and_process_group(tmp_path, monkeypatch):
    """main's teardown runs on every exit: here the held-out evaluation fails after the engine started, and the engine,
    the logger and the process group are each closed once (the exception itself reaches the caller)."""
    from types import SimpleNamespace

    from qlfast import train
    from qlfast.trainer.context import RunContext

    closed = []

    class Closes:
        def __init__(self, name):
            self.name = name

        def close(self):
            closed.append(self.name)

        def write(self, msg):
            pass

        def reset(self):
            pass

    def start(cfg, env, reward):
        tokenizer = SimpleNamespace(eos_token_id=0)
        ds = SimpleNamespace(sft=[], sft_prompt_ids=[])
        ctx = RunContext(cfg, env, tokenizer, torch.nn.Linear(3, 2), ds, reward, Closes("logger"), tmp_path)
        return ctx, SimpleNamespace(curriculum=None, difficulty=None)

    def start_engine(self, weight_version=0):
        self.engine = Closes("engine")
        return self.engine

    def fails(*args, **kwargs):
        raise RuntimeError("the judge went away")

    monkeypatch.setattr(train.context, "start", start)
    monkeypatch.setattr(RunContext, "start_engine", start_engine)
    monkeypatch.setattr(train.checkpoint.Checkpointer, "save", lambda self, tag: None)
    monkeypatch.setattr(train.heldout, "accuracy", fails)
    monkeypatch.setattr(train.comm, "shutdown", lambda: closed.append("process group"))
    with pytest.raises(RuntimeError, match="the judge went away"):
        train.main(["--sft.steps=0", f"--train.out_dir={tmp_path}"])
    assert closed == ["logger", "engine", "process group"]


@pytest.mark.parametrize("layout", ["replicated", "per_rank"])
def test_checkpointer_round_trips_every_part(tmp_path, layout):
    """What Checkpointer saves comes back into the same parts: the TrainState and the JSON parts (state.json), the
    model, optimizer and scheduler (replicated.pt, written once; or, as checkpoints before it did, in
    trainer-rank0.pt), the RNG streams (trainer-rank0.pt), and a resumed step equals the uninterrupted one."""
    from qlfast.trainer.state import TrainState

    class Counter:  # a JSON part, like the curriculum's samplers
        def __init__(self):
            self.n = 0

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    def parts():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = optim.adamw(model, lr=1e-2)
        sched = optim.schedule(opt, warmup=2)
        state, counter = TrainState(), Counter()
        same = {"model": model, "opt": opt, "sched": sched}
        ckpt = checkpoint.Checkpointer(tmp_path, shared={"train": state, "counter": counter},
                                       replicated=same if layout == "replicated" else {},
                                       per_rank={**({} if layout == "replicated" else same),
                                                 "rng": checkpoint.RNGState()},
                                       export=lambda d: Path(d).mkdir(parents=True))
        return model, opt, sched, state, counter, ckpt

    def step(model, opt, sched):
        loss = model(torch.randn(5, 4)).square().sum()  # draws from the torch RNG: its state must come back too
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        return [p.detach().clone() for p in model.parameters()]

    model, opt, sched, state, counter, ckpt = parts()
    step(model, opt, sched)
    state.stage, state.rl_step, state.weight_version = "rl", 3, 4
    state.evals.append({"stage": "after SFT", "step": 0, "accuracy": 0.25})
    counter.n = 7
    path = ckpt.save("rl-000003")
    assert (path / "state.json").exists() and (path / "trainer-rank0.pt").exists() and ckpt.latest() == path
    own = torch.load(path / "trainer-rank0.pt", weights_only=False)
    assert set(own) == ({"rng"} if layout == "replicated" else {"model", "opt", "sched", "rng"})
    assert (path / "replicated.pt").exists() == (layout == "replicated")
    expected = step(model, opt, sched)
    if layout == "per_rank":  # an old checkpoint loads into today's layout: the parts come from trainer-rank0.pt
        layout = "replicated"

    model2, opt2, sched2, state2, counter2, ckpt2 = parts()
    assert state2.rl_step == 0 and counter2.n == 0
    ckpt2.load(ckpt2.latest())
    assert state2 == state and state2.evaluated("after SFT") and not state2.evaluated("after phase 1")
    assert counter2.n == 7 and sched2.last_epoch == 1
    assert all(torch.equal(a, b) for a, b in zip(step(model2, opt2, sched2), expected))


def test_sft_response_does_not_reopen_the_thinking_the_template_opened():
    """An R1-style generation prompt ends in "<think>\\n": the worked response must not add a second "<think>"."""
    from types import SimpleNamespace

    from qlfast.trainer import build, sft

    cfg = config.from_args(["--data.synthetic_train=8", "--data.synthetic_sft=8", "--data.synthetic_eval=4"])
    tok, _ = build.tokenizer_and_model(cfg, torch.device("cpu"))
    worked = "<think>\nKestrel House: 4.\n</think> Therefore, the answer is 4"
    ex = SimpleNamespace(uid="a", extra={"reasoning": worked})
    opened = tok.encode("What is the code?\nAssistant: <think>\n", add_special_tokens=False)
    plain = tok.encode("What is the code?\nAssistant:", add_special_tokens=False)
    (r_opened,), (r_plain,) = sft.response_ids(tok, [ex], [opened]), sft.response_ids(tok, [ex], [plain])
    assert tok.decode(opened + r_opened[:-1]).count("<think>") == 1
    assert tok.decode(r_opened[:-1]).startswith("Kestrel House: 4.")
    assert tok.decode(r_plain[:-1]).startswith("<think>")  # a prompt that opened nothing keeps the response whole


def test_report_shows_what_an_rl_user_looks_at_first(tmp_path):
    from qlfast.trainer.report import figure, write_report

    rows = [{"step": s, "phase": s // 3, "reward_mean": 0.1 * s, "accuracy": 0.1 * s, "response_len_mean": 20.0 + s,
             "truncated_frac": 0.1, "entropy_mean": 1.0 - 0.1 * s, "clip_frac_low": 0.01, "clip_frac_high": 0.02,
             "grad_norm": 0.5, "time_rollout_reward": 1.0, "time_train": 0.5, "time_sync": 0.1, "judge_calls": 0}
            for s in range(6)]
    evals = [{"stage": "after SFT", "step": 0, "accuracy": 0.2, "greedy_accuracy": 0.25, "n": 40, "samples": 4}]

    def texts(fig):
        return [t.get_text() for ax in fig.axes for t in [ax.title, *(ax.get_legend().get_texts()
                                                                       if ax.get_legend() else [])]]

    shown = " | ".join(texts(figure(rows, evals)))
    for want in ("accuracy (rule)", "k=4", "avg@4", "mean response tokens", "token entropy", "clipped high",
                 "grad norm", "rollout + reward", "weight sync"):
        assert want in shown, (want, shown)
    assert "rule+judge" not in shown  # no judge ran: the accuracy is the rule's alone
    judged = [{**r, "judge_calls": 3} for r in rows]
    assert "accuracy (rule+judge)" in " | ".join(texts(figure(judged, evals)))
    assert write_report(tmp_path, rows, evals).exists()
    assert "| after SFT | 0 | 20.0%" in (tmp_path / "report.md").read_text()


def test_a_full_disk_at_a_checkpoint_names_the_path_and_keeps_latest(tmp_path, monkeypatch):
    import errno

    def write_model(d):
        Path(d).mkdir(parents=True, exist_ok=True)

    first = checkpoint.save(tmp_path, "rl-000001", save_model=write_model, state={"a": 1}, trainer_state={"x": 1})

    def full(*_a, **_k):  # what torch.save raises when the disk fills mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(OSError) as e:
        checkpoint.save(tmp_path, "rl-000002", save_model=write_model, state={"a": 2}, trainer_state={"x": 2})
    assert e.value.errno == errno.ENOSPC and "rl-000002" in e.value.filename and "LATEST unchanged" in str(e.value)
    assert checkpoint.latest(tmp_path) == first and not (tmp_path / "checkpoints" / "rl-000002.tmp").exists()


def test_phase_line_sums_up_a_phase():
    from qlfast.trainer.report import phase_line

    rows = [{"step": s, "phase": 0 if s < 10 else 1, "accuracy": s / 20, "time_step": 6.0, "time_rollout_reward": 3.0,
             "response_len_mean": 30.0} for s in range(20)]
    line = phase_line(rows, 1)
    assert line.startswith("phase 2 done: 10 steps in 1.0 min (50% rollout + reward)"), line
    assert "rollout accuracy 52.5% -> 92.5%" in line and "response 30 tokens" in line
