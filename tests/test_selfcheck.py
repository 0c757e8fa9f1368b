"""The self-check (tools/selfcheck.py): it passes on this CPU, a broken op fails exactly its rows, the plan of an
Ascend run (faked device), the stored references against a fresh PyTorch run, msrun, and the test suite's device
option."""
import pytest

from pixart import backend
from pixart.models import pixart as pixart_module
from pixart.nn import Attention, Linear
from pixart.selfcheck import checks, plan, runner
from pixart.cli.selfcheck import SelfCheckFailed, build_parser, run as run_command
from pixart.selfcheck.fixtures import REFERENCES
from pixart.cli.options import parse_args
from tests import conftest

TRANSFORMERS = ("alpha", "alpha-1024", "sigma", "sigma-kv", "lora")


def _by_check(rows):
    return {r.check: r for r in rows}


def test_a_broken_op_fails_exactly_its_rows(monkeypatch):
    """α-1024's micro-conditions perturbed by 1e-3 of their size: that row fails, the α and T5 rows still pass."""
    checks_run = ["alpha", "alpha-1024", "t5"]
    rows = runner.run("CPU", ["fp32"], ["pynative"], checks_run, log=lambda _: None)
    assert all(r.status == "ok" for r in rows), runner.table(rows)
    original = pixart_module.SizeEmbedder.construct

    def perturbed(self, s):
        emb = original(self, s)
        return emb * 1.001

    monkeypatch.setattr(pixart_module.SizeEmbedder, "construct", perturbed)
    rows = _by_check(runner.run("CPU", ["fp32"], ["pynative"], checks_run, log=lambda _: None))
    assert [name for name, r in rows.items() if r.failed] == ["alpha-1024"]
    assert rows["alpha-1024"].error > runner.TOLERANCES["fp32"]
    assert "FAILED: 1 of 3 checks: alpha-1024 (fp32, pynative)" in runner.summary(list(rows.values()))


def test_plan_of_a_faked_ascend_and_its_layers(monkeypatch):
    monkeypatch.setattr(backend, "device_target", lambda: "Ascend")
    steps = plan.plan(["fp32", "fp16", "bf16"], ["graph", "pynative"], msrun=True)
    assert len(steps) == len(checks.CHECKS) * 3 * 2 and not [s for s in steps if s.skip]
    for s in steps:
        assert s.kernels["layers"].startswith("mint")
        assert s.kernels["execution"] == ("graph (jit O1)" if s.mode == "graph" else "PyNative")
        assert s.kernels.get("attention") == (None if s.check == "t5" else "FlashAttentionScore (fp32 softmax inside)")
    recompute = {(s.dtype, s.mode): s.kernels["recompute"] for s in steps if s.check == "train-recompute"}
    assert set(recompute.values()) == {"Cell.recompute() on every block"}
    train = {s.dtype: s.kernels["precision"] for s in steps if s.check == "train" and s.mode == "graph"}
    assert train["fp32"] == "fp32" and train["bf16"].startswith("auto_mixed_precision bf16")
    assert [s.kernels["parallel"] for s in steps if s.check == "train-dp"][0].startswith("msrun --worker_num=2")
    # the layers a check builds follow the same selection: mint kernels and FlashAttentionScore
    model = checks.pixart_model("alpha")
    cells = [c for _, c in model.cells_and_names()]
    assert all(c.flash for c in cells if isinstance(c, Attention))
    assert all(c.use_mint for c in cells if isinstance(c, Linear))


def test_plan_on_this_cpu():
    steps = {(s.check, s.dtype, s.mode): s for s in plan.plan(["fp32", "fp16", "bf16"], ["graph", "pynative"])}
    assert not any(check == "train-dp" for check, _, _ in steps)  # only with --msrun
    for (check, dtype, mode), s in steps.items():
        kind = checks.CHECKS[check].kind
        refusal = plan.dtype_refusal("bf16", kind in ("forward", "sampler") and not check.startswith("vae"))
        if dtype == "bf16" and refusal:
            assert s.skip.startswith("bf16 not supported on this backend (CPU)")
        elif dtype != "fp32" and kind == "train":
            assert s.skip == f"{dtype} training is for Ascend (train.py trains in fp32 on CPU)"
        else:
            assert s.skip is None and s.kernels["layers"].startswith("MindSpore ops")
            assert s.kernels.get("attention", "BatchMatMul + fp32 softmax") == "BatchMatMul + fp32 softmax"
    assert steps["train-recompute", "fp32", "graph"].kernels["recompute"].startswith("block by block")
    assert steps["train-recompute", "fp32", "pynative"].kernels["recompute"] == "Cell.recompute() on every block"


def test_command_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(build_parser(), ["--dtype", "fp32,fp8"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: argument --dtype: unknown dtype fp8; choose from fp32, fp16, bf16 (comma-separated)")
    with pytest.raises(ValueError, match="--checks train-dp runs under msrun: add --msrun"):
        run_command(parse_args(build_parser(), ["--checks", "t5,train-dp"]))
    args = parse_args(build_parser(), ["--device_target", "auto", "--mode", "pynative", "--checks", "t5", "--plan"])
    assert args.device_target == "CPU"
    run_command(args)
    assert capsys.readouterr().out.split()[:3] == ["t5", "fp32", "pynative"]


def test_failure_names_the_rows(monkeypatch, capsys):
    refs = runner.load_references()
    refs["t5/hidden"] = refs["t5/hidden"] * 1.01
    monkeypatch.setattr(runner, "load_references", lambda: refs)
    args = parse_args(build_parser(), ["--device_target", "CPU", "--dtype", "fp32", "--mode", "pynative",
                                       "--checks", "t5"])
    with pytest.raises(SelfCheckFailed, match=r"self-check FAILED: 1 of 1 checks: t5 \(fp32, pynative\)"):
        run_command(args)
    out = capsys.readouterr().out
    assert "| t5    | CPU    | fp32  | pynative |" in out and "| FAIL |" in out


def test_device_option_skips_what_cannot_run_there(monkeypatch):
    class Item:
        def __init__(self, path, function, parity=False):
            self.fspath, self.function, self.parity = path, function, parity

        def get_closest_marker(self, name):
            return object() if name == "parity" and self.parity else None

    tests = conftest.Path(conftest.__file__).parent

    def uses_diffusers():
        return conftest.diffusers_model  # noqa: F821 (only its name matters: the skip reads the code's names)

    assert conftest.device_skip_reason(Item(tests / "test_t5.py", test_plan_on_this_cpu)) is None  # on CPU
    monkeypatch.setattr(conftest, "TEST_DEVICE", "Ascend")
    reason = lambda *a, **k: conftest.device_skip_reason(Item(*a, **k))
    assert reason(tests / "test_blockwise.py", test_plan_on_this_cpu).startswith("CPU only: block-by-block")
    assert reason(tests / "test_t5.py", test_plan_on_this_cpu).startswith("needs PyTorch")  # imports torch
    assert reason(tests / "test_pixart.py", uses_diffusers).startswith("needs PyTorch")  # a torch helper
    assert reason(tests / "test_pixart.py", test_plan_on_this_cpu, parity=True).startswith("needs PyTorch")
    assert reason(tests / "test_pixart.py", test_plan_on_this_cpu) is None
    assert reason(tests / "test_selfcheck.py", test_plan_on_this_cpu) is None


# ---------------------------------------------------------------------------------------------------------------
# Slow: the self-check in fp16 and graph mode, fresh references, msrun
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_selfcheck_passes_in_fp16_and_both_modes():
    """fp16 in both modes on the checks whose precision rules differ (micro-conditions, T5's fp32 islands, the
    SDXL VAE's fp32 GroupNorm, LoRA); fp32 graph mode's block-by-block recompute. (Every check in both dtypes and
    modes: python tools/selfcheck.py, docs/selfcheck.md.)"""
    rows = runner.run("CPU", ["fp16"], ["graph", "pynative"], ["alpha-1024", "t5", "vae-sdxl", "lora"],
                      log=lambda _: None)
    rows += runner.run("CPU", ["fp32"], ["graph"], ["train-recompute"], log=lambda _: None)
    assert not [r for r in rows if r.status != "ok"], runner.table(rows)
    backend.setup("CPU", "pynative")


@pytest.mark.slow
@pytest.mark.parity
def test_stored_references_equal_a_fresh_pytorch_run():
    from tools import make_selfcheck_refs
    fresh = make_selfcheck_refs.compute()
    stored = runner.load_references()
    assert sorted(fresh) == sorted(k for k in stored if not k.startswith("meta/"))
    errors = {k: runner.rel_err(fresh[k], stored[k]) for k in fresh}
    assert max(errors.values()) <= runner.TOLERANCES["fp32"], errors
    assert REFERENCES.stat().st_size < 200_000  # small enough to live in the repository


@pytest.mark.slow
@pytest.mark.e2e
def test_msrun_data_parallel_step_equals_the_reference():
    rows = runner.run("CPU", ["fp32"], ["pynative"], ["train-dp"], msrun=True, log=lambda _: None)
    assert [r.status for r in rows] == ["ok"], runner.table(rows) + "\n" + rows[0].note
