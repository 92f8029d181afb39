"""benchmarks/smoke.py on the CPU (CUDA-only checks skipped, never failed; each check independent), the attention
backend's fallback along the priority list, and the harness's --phases / --min-mb selections."""
import json

import pytest
import torch

from benchmarks import _attention, _kernels, smoke, step_time


def test_smoke_on_cpu_runs_what_it_can_and_skips_the_cuda_checks(tmp_path):
    path = tmp_path / "smoke.json"
    results = {c.name: c for c in smoke.main(["--device", "cpu", "--json", str(path)])}
    assert list(results) == list(smoke.CHECKS)
    assert results["cuda_graph_rollout"].status == "skipped"
    assert all(c.status == "ok" for n, c in results.items() if n != "cuda_graph_rollout"), results
    assert results["lora_grads"].detail["lora_tensors"] > results["lora_grads"].detail["all_zero"]
    assert results["compiled_block"].detail["out_rel_err"] <= 1e-4
    saved = json.loads(path.read_text())
    assert [c["name"] for c in saved["checks"]] == list(smoke.CHECKS) and saved["device"] == "cpu"


def test_a_failing_check_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    def broken(_setting):
        raise RuntimeError("planted failure")

    monkeypatch.setitem(smoke.CHECKS, "attention", broken)
    results = smoke.main(["--device", "cpu", "--only", "env,attention,cuda_graph_rollout"])
    assert [c.status for c in results] == ["ok", "fail", "skipped"]
    assert "RuntimeError: planted failure" in results[1].detail["error"]
    assert "[smoke] attention: FAIL" in capsys.readouterr().out


def test_a_failing_attention_backend_falls_back_to_the_next(monkeypatch):
    real = _attention.probe_backend

    def probe(name, *args, **kwargs):
        if name == "sdpa_cudnn":
            raise RuntimeError("no kernel for this head size")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(_attention, "probe_backend", probe)
    monkeypatch.setattr(_attention, "backend_available", lambda name, device, dtype: name in (
        "sdpa_cudnn", "sdpa_flash", "sdpa_math"))  # as on a GPU without flash-attn or xformers
    choice = _attention.working_attention_backend(torch.device("cpu"), torch.float32, 2, 16, 40, log=lambda *_: None)
    assert choice.backend == "sdpa_flash" and list(choice.rejected) == ["sdpa_cudnn"]
    assert "no kernel for this head size" in choice.rejected["sdpa_cudnn"] and choice.rel_err < 1e-5


def test_a_wrong_backend_fails_its_probe(monkeypatch):
    monkeypatch.setattr(_attention, "attention", lambda q, k, v, backend: (
        q * k + v if backend == "sdpa_flash" else torch.nn.functional.scaled_dot_product_attention(q, k, v)))
    with pytest.raises(ValueError, match="relative error"):
        _attention.probe_backend("sdpa_flash", torch.device("cpu"), torch.float32, 2, 16, 40)


def test_phase_and_kernel_selections():
    args = step_time.parse_args(["--phases", "train", "--variants=-shared_batch", "--min-mb", "64"])
    assert args.phase_list == ("train",) and args.min_mb == 64
    assert step_time.parse_args([]).phase_list == ("rollout", "rollout_cfg", "train", "end_to_end")
    with pytest.raises(SystemExit):
        step_time.parse_args(["--phases", "train,warmup"])
    cases = _kernels.kernel_cases(torch.device("cuda"), "quick", torch.bfloat16)
    big = {(c.rows, c.latent) for c in cases
           if _kernels.loss_working_set(c, torch.float32, torch.bfloat16) >= 64e6}
    # bf16 v / v_ref / v_ema / gradients, float32 target: 16 bytes per latent value
    assert big == {(72, (16, 64, 64)), (18, (16, 128, 128)), (72, (16, 128, 128)), (144, (16, 128, 128))}


class _FakeCapture:
    """Stands in for torch.cuda.graph / CUDAGraph on a CPU: records how the smoke check captures."""

    def __init__(self, fail_exit: bool = False) -> None:
        self.events: list[str] = []
        self.fail_exit = fail_exit

    def graph(self, g, **kwargs):
        fake = self

        class Ctx:
            def __enter__(self):
                fake.events.append("capture on torch.cuda.graph's side stream")

            def __exit__(self, *exc):
                fake.events.append("capture_end")
                if fake.fail_exit:
                    raise RuntimeError("operation failed due to a previous error during capture")
                return False

        return Ctx()

    def sync_mode(self, mode):
        self.events.append(f"sync_debug {mode}")


def _patch_capture(monkeypatch, fake):
    replays = []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: type("G", (), {"replay": lambda self: replays.append(1)})())
    monkeypatch.setattr(torch.cuda, "graph", fake.graph)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", fake.sync_mode)
    return replays


def test_the_graph_check_captures_through_torch_cuda_graph_under_sync_errors(monkeypatch):
    fake = _FakeCapture()
    replays = _patch_capture(monkeypatch, fake)
    x = torch.randn(3)
    out = smoke.capture_and_replay(lambda: fake.events.append("step") or x * 2)
    assert torch.equal(out, x * 2) and replays == [1]
    assert fake.events == ["capture on torch.cuda.graph's side stream", "sync_debug error", "step", "sync_debug 0",
                           "capture_end"]


def test_a_step_failing_inside_the_capture_reports_its_own_error(monkeypatch):
    fake = _FakeCapture(fail_exit=True)  # capture_end complains about the broken capture, as CUDA does
    replays = _patch_capture(monkeypatch, fake)

    def step():
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing (a host sync)")

    with pytest.raises(RuntimeError, match="a host sync"):
        smoke.capture_and_replay(step)
    assert replays == [] and fake.events[-2:] == ["sync_debug 0", "capture_end"]
