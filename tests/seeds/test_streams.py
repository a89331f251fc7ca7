from __future__ import annotations

import copy
import threading
from collections.abc import Callable

import anyio
import pytest
import torch
from torch import nn

from esper_async.blueprints import SlotKind, build, library
from esper_async.errors import StreamError
from esper_async.runtime import BridgeKind, CompletionBridge
from esper_async.seeds import SeedSlot, SeedState, enable_side_streams, wrap
from esper_async.seeds._streams import train_beside

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
#: GPU cycles of torch.cuda._sleep: ~50 ms on an H100, far longer than launching anything.
LONG_SLEEP = 100_000_000


# --- hosts with seeds in TRAINING ---


class Block(nn.Module):
    """A wrapped module that is neither a Conv2d nor a Linear."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.GroupNorm(2, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x)))


class Slow(nn.Module):
    """A seed that first keeps its stream busy, so that its stream lags well behind the host's:
    a tensor freed too early would be overwritten before the seed reads it."""

    def __init__(self, inner: nn.Module, cycles: int) -> None:
        super().__init__()
        self.inner = inner
        self.cycles = cycles

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.cycles and h.is_cuda:
            torch.cuda._sleep(self.cycles)
        return self.inner(h)


def conv_host() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    )


def block_host() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 1), Block(8), Block(8), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10))


HOSTS: dict[str, tuple[Callable[[], nn.Module], list[object]]] = {
    "conv2d": (conv_host, [nn.Conv2d]),
    "linear": (conv_host, [nn.Linear]),
    "conv2d+linear": (conv_host, [nn.Conv2d, nn.Linear]),
    "wrapped-block": (block_host, [Block]),
}


def grown(host: str, device: str, *, slow: int = 0) -> tuple[nn.Module, dict[str, SeedSlot]]:
    """A host with a seed in TRAINING in every slot; non-zero seed weights everywhere."""
    make, targets = HOSTS[host]
    torch.manual_seed(0)
    model = make()
    slots = wrap(model, targets, example_input=torch.randn(2, 3, 8, 8))
    for slot in slots.values():
        assert slot.contract is not None
        blueprint = library(slot.contract.kind)[0]
        slot.germinate(blueprint)
        seed = build(blueprint, slot.contract, seed=0)
        with torch.no_grad():
            for p in seed.parameters():
                p.normal_(0, 0.1)
        slot.graft(Slow(seed, slow), "test-kernel")
        assert slot.state is SeedState.TRAINING
    return model.to(device), slots


def batches(device: str, n: int = 3, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 8, 8, generator=gen).to(device),
             torch.randint(0, 10, (size,), generator=gen).to(device)) for _ in range(n)]


def train(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def one_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --- the autograd part, on any device ---


@pytest.mark.parametrize(
    "kind", [pytest.param(SlotKind.CONV, id="conv"), pytest.param(SlotKind.LINEAR, id="linear")],
)
def test_train_beside_matches_the_inline_formula(kind: SlotKind) -> None:
    torch.manual_seed(0)
    bp = library(kind)[0]
    from esper_async.blueprints import SlotContract

    contract = SlotContract(kind, (4, 5, 5) if kind is SlotKind.CONV else (6,), "float32")
    seed = build(bp, contract, seed=0)
    with torch.no_grad():
        for p in seed.parameters():
            p.normal_()
    h_leaf = torch.randn(3, *contract.shape, requires_grad=True)
    weight = torch.randn(3, *contract.shape)

    def grads(use_beside: bool) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        seed.zero_grad(set_to_none=True)
        h_leaf.grad = None
        h = h_leaf * 1.5
        if use_beside:
            out = train_beside(seed, h, None)
        else:
            s = seed(h.detach())
            out = h + (s - s.detach())
        (out * weight).sum().backward()
        assert h_leaf.grad is not None
        return out.detach(), [p.grad.clone() for p in seed.parameters()], h_leaf.grad.clone()

    out_a, seed_a, host_a = grads(False)
    out_b, seed_b, host_b = grads(True)
    assert torch.equal(out_a, out_b)
    assert torch.equal(host_a, host_b)
    assert all(torch.equal(a, b) for a, b in zip(seed_a, seed_b, strict=True))
    assert any(g.abs().sum() > 0 for g in seed_b), "the seed learned nothing"


def test_train_beside_output_is_a_new_buffer() -> None:
    h = torch.randn(2, 4, requires_grad=True) * 1.0
    out = train_beside(nn.Linear(4, 4), h, None)
    assert out.data_ptr() != h.data_ptr()


def test_cpu_slots_have_no_side_stream_and_cannot_get_one() -> None:
    model, slots = grown("conv2d", "cpu")
    assert all(s.side_stream is None for s in slots.values())
    with pytest.raises(StreamError, match="need a CUDA device"):
        enable_side_streams(model)


def test_side_stream_count_must_be_positive() -> None:
    model, _ = grown("conv2d", "cpu")
    with pytest.raises(ValueError, match="at least 1"):
        enable_side_streams(model, streams=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_bridge_without_cuda_raises() -> None:
    with pytest.raises(StreamError, match="needs CUDA"):
        CompletionBridge()


# --- CUDA: bridges ---


@CUDA
@pytest.mark.asyncio
@pytest.mark.parametrize("kind", [pytest.param(k, id=k.value) for k in BridgeKind])
async def test_bridge_resolves_after_the_work_and_leaves_the_loop_free(kind: BridgeKind) -> None:
    bridge = CompletionBridge(kind)
    stream = torch.cuda.Stream()
    marker = torch.cuda.Event()
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.001)
            ticks += 1

    with torch.cuda.stream(stream):
        torch.cuda._sleep(LONG_SLEEP)
        marker.record()
        completion = bridge.arm()
    assert not marker.query(), "the GPU finished before the test could wait: sleep longer"
    async with anyio.create_task_group() as tg:
        tg.start_soon(heartbeat)
        with anyio.fail_after(30):
            await completion.wait()
        tg.cancel_scope.cancel()
    assert marker.query(), f"{kind} resolved before the stream's work was done"
    assert ticks >= 5, f"the loop was blocked while {kind} waited"


@CUDA
@pytest.mark.asyncio
async def test_host_func_bridge_armed_from_a_fresh_thread() -> None:
    bridge = CompletionBridge(BridgeKind.HOST_FUNC)
    stream = torch.cuda.Stream()
    marker = torch.cuda.Event()

    def launch() -> object:
        with torch.cuda.stream(stream):
            torch.cuda._sleep(LONG_SLEEP // 10)
            marker.record()
            return bridge.arm(stream)

    holder: list[object] = []
    thread = threading.Thread(target=lambda: holder.append(launch()))
    thread.start()
    thread.join()
    with anyio.fail_after(30):
        await holder[0].wait()  # type: ignore[attr-defined]
    assert marker.query()


@CUDA
@pytest.mark.asyncio
@pytest.mark.parametrize("kind", [pytest.param(k, id=k.value) for k in BridgeKind])
async def test_cancelled_wait_leaves_the_bridge_usable(kind: BridgeKind) -> None:
    bridge = CompletionBridge(kind)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(LONG_SLEEP)
    with anyio.move_on_after(0.005) as scope:
        await bridge.wait(stream)
    assert scope.cancelled_caught
    with anyio.fail_after(30):
        await bridge.wait(stream)
    assert stream.query()


# --- CUDA: seeds on side streams ---


@CUDA
@pytest.mark.parametrize("host", [pytest.param(h, id=h) for h in HOSTS])
@pytest.mark.usefixtures("deterministic_cudnn")
def test_side_stream_gradients_equal_the_inline_path(host: str) -> None:
    inline, _ = grown(host, "cuda")
    beside = copy.deepcopy(inline)
    with enable_side_streams(beside) as lent:
        assert len(lent.streams) == len(lent.slots) > 0
        x, y = batches("cuda", 1)[0]
        g_inline = one_backward(inline, x, y)
        g_beside = one_backward(beside, x, y)
    assert g_inline.keys() == g_beside.keys()
    seed_grads = [n for n in g_beside if ".seed." in n]
    assert seed_grads and any(g_beside[n].abs().sum() > 0 for n in seed_grads)
    for name in g_inline:
        assert torch.equal(g_inline[name], g_beside[name]), name


@CUDA
@pytest.mark.parametrize("host", [pytest.param(h, id=h) for h in HOSTS])
@pytest.mark.parametrize("shared", [pytest.param(None, id="stream-per-slot"),
                                    pytest.param(1, id="one-shared-stream")])
def test_side_stream_training_matches_inline_with_lagging_seeds(
    host: str, shared: int | None
) -> None:
    # Slow seeds make the side streams lag the host by milliseconds: a tensor the host's stream
    # freed while a seed still read it would be reused and overwritten, and the figures differ.
    inline, _ = grown(host, "cuda", slow=LONG_SLEEP // 50)
    beside = copy.deepcopy(inline)
    data = batches("cuda", 4, size=64)
    losses_inline = train(inline, data)
    with enable_side_streams(beside, streams=shared):
        losses_beside = train(beside, data)
    torch.testing.assert_close(torch.tensor(losses_beside), torch.tensor(losses_inline))
    for (name, a), (_, b) in zip(inline.named_parameters(), beside.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, msg=name)


@CUDA
def test_side_streams_only_change_training_seeds_and_are_taken_back() -> None:
    model, slots = grown("conv2d", "cuda")
    first = next(iter(slots.values()))
    first.start_blending(steps=4)
    x, _ = batches("cuda", 1)[0]
    with torch.no_grad():
        reference = model(x)
    lent = enable_side_streams(model)
    assert all(s.side_stream is not None for s in slots.values())
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference)
    lent.close()
    assert all(s.side_stream is None for s in slots.values())
