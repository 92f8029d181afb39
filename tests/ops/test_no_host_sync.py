"""No host-device traffic on the hot path: a routed transformer call, `awm_loss`, `sde_step`, a whole AWM
training micro-batch (timesteps, noisy rows, the three velocities, the loss and its backward) and a rollout step
neither read a tensor value back on the host (`.item()`, `bool(tensor)`, `.tolist()`, `.cpu()`:
aten._local_scalar_dense) nor build a tensor from Python data (`torch.tensor`, `new_tensor`: aten.lift_fresh) nor
move a tensor between devices (`.to(device)`), each of which is a copy plus a stream sync on CUDA and illegal
inside CUDA-graph capture. Checked on CPU, where the same calls are dispatched (the device moves are recorded on
a CUDA machine; on the CPU `.cpu()` stands for them), and with torch's sync debug mode on CUDA."""
import pytest
import torch
from diffusers import SD3Transformer2DModel
from torch.utils._python_dispatch import TorchDispatchMode

from awm_fast.algorithms.awm import AWM
from awm_fast.config import load_config
from awm_fast.models.lora import EMA, POLICY, adapter_params, add_adapters
from awm_fast.models.policy import Conditioning, GuidedVelocity
from awm_fast.models.routing import BASE, routed, routing_mask
from awm_fast.ops import awm_loss, sde_step
from awm_fast.ops.dispatch import backend_present
from awm_fast.sampling.rollout import rollout_step
from awm_fast.sampling.timesteps import TIMESTEP_MODES, time_grid
from awm_fast.families.digits import tiny_transformer_config

HOST_OPS = ("aten._local_scalar_dense", "aten.lift_fresh", "aten.lift_fresh_copy")
PY_CALLS = (("torch", "tensor"), ("torch", "as_tensor"), ("Tensor", "new_tensor"), ("Tensor", "tolist"),
            ("Tensor", "item"), ("Tensor", "numpy"), ("Tensor", "cpu"))
MOVES = (("Tensor", "to"), ("Tensor", "cuda"))  # recorded when the result is on another device than the input
CPU_BACKENDS = [b for b in ("torch", "cpp") if backend_present(b, "cpu")]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
ROWS = 2


class HostTraffic(TorchDispatchMode):
    """Records every dispatched op that reads a value back to the host or lifts Python data into a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        if name in HOST_OPS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_traffic(monkeypatch):
    """A context manager recording host traffic: the dispatch mode above plus the Python entry points (patched,
    so a call that a dispatch mode cannot see, e.g. tolist() on a CPU tensor, is recorded too)."""
    monkeypatch.delenv("AWM_FAST_DEBUG_CHECKS", raising=False)  # the opt-in value checks do sync
    mode = HostTraffic()
    owners = {"torch": torch, "Tensor": torch.Tensor}
    for owner, attr in PY_CALLS:
        original = getattr(owners[owner], attr)

        def spy(*args, _original=original, _name=f"{owner}.{attr}", **kwargs):
            if mode.active:
                mode.seen.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(owners[owner], attr, spy)
    for owner, attr in MOVES:
        original = getattr(owners[owner], attr)

        def move_spy(self, *args, _original=original, _name=f"{owner}.{attr} across devices", **kwargs):
            out = _original(self, *args, **kwargs)
            if mode.active and isinstance(out, torch.Tensor) and out.device != self.device:
                mode.seen.append(_name)
            return out

        monkeypatch.setattr(owners[owner], attr, move_spy)
    mode.active = False

    class Recording:
        def __enter__(self):
            mode.active = True
            mode.__enter__()
            return mode

        def __exit__(self, *exc):
            mode.active = False
            return mode.__exit__(*exc)

    return Recording


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = SD3Transformer2DModel(**tiny_transformer_config()).requires_grad_(False)
    add_adapters(m, rank=4, alpha=8, init="gaussian", targets=TARGETS)
    with torch.no_grad():
        for name in (POLICY, EMA):
            for p in adapter_params(m, name).values():
                p.add_(0.05 * torch.randn_like(p))
    return m


def _call(model, mask, rows):
    gen = torch.Generator().manual_seed(1)
    with routed(mask):
        return model(hidden_states=torch.randn(rows, 1, 8, 8, generator=gen),
                     encoder_hidden_states=torch.randn(rows, 2, 32, generator=gen),
                     pooled_projections=torch.randn(rows, 32, generator=gen),
                     timestep=torch.rand(rows, generator=gen) * 1000, return_dict=False)[0]


@pytest.mark.parametrize("groups", [[(POLICY, ROWS)], [(BASE, ROWS), (EMA, ROWS)], [(POLICY, 1), (BASE, 1), (EMA, 1)]],
                         ids=["policy", "ref_ema", "mixed"])
def test_routed_transformer_call_has_no_host_traffic(model, host_traffic, groups):
    mask = routing_mask(groups, "cpu")  # built once on the host, outside the call (the policy caches it)
    rows = sum(n for _, n in groups)
    _call(model, mask, rows)  # first call outside the recording (lazy initialisation is allowed there)
    with host_traffic() as seen:
        out = _call(model, mask, rows)
        if out.requires_grad:  # policy rows: the LoRA backward too
            out.square().sum().backward()
    assert seen.seen == [], f"host traffic in a routed call: {sorted(set(seen.seen))}"
    assert torch.isfinite(out).all()


def _loss_inputs(gen, rows=4):
    mk = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(v=mk(rows, 3, 4).requires_grad_(), target=mk(rows, 3, 4), advantages=mk(rows),
                t=torch.rand(rows, generator=gen) * 0.9 + 0.05, v_ref=mk(rows, 3, 4), v_ema=mk(rows, 3, 4),
                old_log_prob=-torch.rand(rows, generator=gen))


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
def test_awm_loss_forward_and_backward_have_no_host_traffic(gen, host_traffic, backend):
    x = _loss_inputs(gen)
    v, target, t, adv = x.pop("v"), x.pop("target"), x.pop("t"), x.pop("advantages")
    awm_loss(v, target, t, adv, beta=0.1, ema_beta=0.2, backend=backend, **x)  # warm-up (extension load)
    with host_traffic() as seen:
        out = awm_loss(v, target, t, adv, beta=0.1, ema_beta=0.2, backend=backend, **x)
        out.loss.backward()
    assert seen.seen == [], f"host traffic in awm_loss(backend={backend!r}): {sorted(set(seen.seen))}"
    assert v.grad is not None and torch.isfinite(v.grad).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
@pytest.mark.parametrize("kind", ["euler_maruyama", "cps"])
def test_sde_step_has_no_host_traffic(gen, host_traffic, backend, kind):
    x, v = torch.randn(3, 2, 4, generator=gen), torch.randn(3, 2, 4, generator=gen).requires_grad_()
    sigma, sigma_next = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.8, 0.5, 0.0])
    noise = torch.randn(3, 2, 4, generator=gen)
    sde_step(x, v.detach(), sigma, sigma_next, noise=noise, kind=kind, backend=backend)  # warm-up
    with host_traffic() as seen:
        with torch.no_grad():
            step = sde_step(x, v, sigma, sigma_next, noise=noise, kind=kind, backend=backend)
            sde_step(x, v, 0.7, 0.6, noise=noise, kind=kind, backend=backend, out=torch.empty_like(x))
        lp = sde_step(x, v, sigma, sigma_next, x_next=step.x_next, kind=kind, backend=backend).log_prob
        lp.sum().backward()
    assert seen.seen == [], f"host traffic in sde_step(backend={backend!r}): {sorted(set(seen.seen))}"
    assert v.grad is not None and torch.isfinite(v.grad).all()


def test_the_recorder_sees_host_traffic(host_traffic):
    """The detector itself: each kind of host traffic is recorded."""
    x = torch.randn(3)
    with host_traffic() as seen:
        x.new_tensor([1.0, 2.0])
        bool(x.sum() > 0)
        x.tolist()
    assert "aten._local_scalar_dense" in seen.seen and "aten.lift_fresh" in seen.seen
    assert "Tensor.new_tensor" in seen.seen and "Tensor.tolist" in seen.seen


def _tiny_policy(device="cpu"):
    from tests.models.tiny_configs import tiny_lora_policy

    return tiny_lora_policy(device)


def _awm(mode, shared):
    return AWM(load_config(None, [f"train.timestep_sampling={mode}", f"train.shared_batch={shared}",
                                  "train.num_timesteps=2", "train.beta=0.01", "train.ema_beta=0.5",
                                  "sample.num_steps=10"]))


def _awm_micro_batch(algo, policy, grid, device, seed):
    """One AWM.micro_batch_loss (3 latents, 2 timesteps, both KL terms) and its backward, as the update runs it."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x0 = torch.randn(3, *policy.latent_shape, generator=gen, device=device)
    cond = Conditioning(torch.randn(3, 2, 32, generator=gen, device=device),
                        torch.randn(3, 32, generator=gen, device=device))
    advantages = torch.randn(3, generator=gen, device=device, dtype=torch.float64)
    loss, parts = algo.micro_batch_loss(policy, x0, cond, advantages, grid, gen)
    loss.backward()
    return loss, parts


@pytest.mark.parametrize("shared", [True, False], ids=["shared_batch", "three_calls"])
@pytest.mark.parametrize("mode", TIMESTEP_MODES)
def test_awm_micro_batch_has_no_host_traffic(host_traffic, mode, shared):
    """Timesteps drawn on the device generator stay there; the rows, the routed calls and the loss too."""
    policy, algo = _tiny_policy(), _awm(mode, shared)
    grid = time_grid(10, 3.0)  # on the device: AWM.update moves it there once per update
    _awm_micro_batch(algo, policy, grid, "cpu", seed=0)  # warm-up: masks and strata built once, outside
    with host_traffic() as seen:
        loss, parts = _awm_micro_batch(algo, policy, grid, "cpu", seed=1)
    assert seen.seen == [], f"host traffic in an AWM micro-batch ({mode}): {sorted(set(seen.seen))}"
    assert torch.isfinite(loss) and set(parts) >= {"loss", "kl", "kl_ema"}


@pytest.mark.parametrize("guidance", [1.0, 4.0], ids=["no_cfg", "cfg"])
@pytest.mark.parametrize("sampler", ["euler_maruyama", "cps"])
def test_rollout_step_has_no_host_traffic(gen, host_traffic, sampler, guidance):
    policy = _tiny_policy()
    cond = Conditioning(torch.randn(2, 2, 32, generator=gen), torch.randn(2, 32, generator=gen))
    null = Conditioning(torch.randn(1, 2, 32, generator=gen), torch.randn(1, 32, generator=gen))
    x = torch.randn(2, *policy.latent_shape, generator=gen)
    with torch.no_grad():
        velocity = GuidedVelocity(policy, cond, guidance, null)  # built once per rollout batch
        rollout_step(velocity, x, 0.9, 0.8, sampler=sampler, noise_level=0.7, generator=gen, guidance_scale=guidance)
        with host_traffic() as seen:
            x_next, log_prob = rollout_step(velocity, x, 0.8, 0.6, sampler=sampler, noise_level=0.7, generator=gen,
                                            guidance_scale=guidance)
    assert seen.seen == [], f"host traffic in a rollout step ({sampler}): {sorted(set(seen.seen))}"
    assert torch.isfinite(x_next).all() and torch.isfinite(log_prob).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's sync debug mode reports CUDA synchronisations")
@pytest.mark.parametrize("mode", TIMESTEP_MODES)
def test_awm_micro_batch_does_not_synchronise_cuda(mode):
    policy, algo, grid = _tiny_policy("cuda"), _awm(mode, True), time_grid(10, 3.0).cuda()
    _awm_micro_batch(algo, policy, grid, "cuda", seed=0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _awm_micro_batch(algo, policy, grid, "cuda", seed=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's sync debug mode reports CUDA synchronisations")
@pytest.mark.parametrize("sampler", ["euler_maruyama", "sa_solver"])
def test_rollout_does_not_synchronise_cuda(sampler):
    """A whole rollout (its grid read on the host once) with sync debug mode set to error."""
    from awm_fast.sampling.rollout import sample_latents

    policy, gen = _tiny_policy("cuda"), torch.Generator(device="cuda").manual_seed(0)
    cond = Conditioning(torch.randn(2, 2, 32, device="cuda"), torch.randn(2, 32, device="cuda"))
    grid = time_grid(4, 3.0)

    def rollout():
        return sample_latents(policy, cond, grid, sampler=sampler, noise_level=0.4, generator=gen)

    rollout()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rollout()
    finally:
        torch.cuda.set_sync_debug_mode("default")
