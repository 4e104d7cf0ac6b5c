"""Attention capture and the attention methods against an explicit float64 transformer.

The references below recompute each zoo ViT by hand from its weights, with the attention
written out as ``softmax(Q K^T / sqrt(d))``, in float64: no SDPA, no
``nn.MultiheadAttention``, nothing of the capture. Their probabilities and gradients are
then what the paper formulas consume (Abnar & Zuidema 2020, Chefer et al. 2021), and the
methods -- run in float64 as well -- must agree to float64 rounding.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.engine.attention import capture_attention
from service.engine.attention_info import AttentionInfo, find_attention
from service.engine.engine import Engine
from service.engine.errors import UnsupportedMethodError
from service.engine.modules import freeze
from service.engine.registry import get_method
from service.engine.types import ExplainContext
from service.models.zoo import IMAGENET_MEAN, IMAGENET_STD, ZOO
from service.runtime.wrap import Normalized
from tests.engine.nets import all_hooks
from tests.engine.two_halves import two_halves_engine

SIZE = 32
VITS = ["vit_s16", "vit_s16_sdpa_reg4"]
RTOL = 1e-9  # float64 against float64, different summation order


def served(name: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    net = ZOO[name]("tiny", 5, SIZE, 0)
    return freeze(Normalized(net, IMAGENET_MEAN, IMAGENET_STD)).to(dtype)


def explicit_forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and every attention's probabilities ``(N, heads, T, T)``, by hand."""
    net = model.model
    z = (x - model.mean) / model.std
    patches = net.patch_embed(z)
    probs: list[torch.Tensor] = []

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        probs.append(p)
        return p @ v

    def heads(t: torch.Tensor, n: int) -> torch.Tensor:  # (N, T, D) -> (N, n, T, D / n)
        return t.reshape(t.shape[0], t.shape[1], n, -1).transpose(1, 2)

    def merge(t: torch.Tensor) -> torch.Tensor:  # (N, n, T, d) -> (N, T, n * d)
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)

    if hasattr(net, "reg_token"):  # timm style: fused qkv, SDPA in the model
        t = patches + net.pos_embed
        prefix = [net.cls_token.expand(len(x), -1, -1), net.reg_token.expand(len(x), -1, -1)]
        t = torch.cat([*prefix, t], dim=1)
        for block in net.blocks:
            n = block.attn.num_heads
            q, k, v = block.attn.qkv(block.norm1(t)).chunk(3, dim=-1)
            t = t + block.attn.proj(merge(attend(heads(q, n), heads(k, n), heads(v, n))))
            t = t + block.mlp(block.norm2(t))
        return net.forward_head(net.norm(t)), probs
    t = torch.cat([net.cls_token.expand(len(x), -1, -1), patches], dim=1) + net.pos_embed
    for block in net.blocks:  # nn.TransformerEncoderLayer, pre-norm
        attn, n = block.self_attn, block.self_attn.num_heads
        q, k, v = F.linear(block.norm1(t), attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
        t = t + attn.out_proj(merge(attend(heads(q, n), heads(k, n), heads(v, n))))
        t = t + block.linear2(F.gelu(block.linear1(block.norm2(t))))
    return net.head(net.norm(t)[:, 0]), probs


def readout(name: str, tokens: int) -> list[int]:
    """The rows each ViT's head reads, by construction: its class token, or (average-pooled
    head over the patches after 1 class + 4 register tokens) every patch row."""
    return [0] if name == "vit_s16" else list(range(5, tokens))


def to_image(relevance: torch.Tensor, rows: list[int], prefix: int) -> torch.Tensor:
    """Rows' mean over the patch columns, on the grid, upsampled to the input."""
    cells = relevance[:, rows].mean(dim=1)[:, prefix:]
    side = math.isqrt(cells.shape[1])
    grid = cells.reshape(-1, 1, side, side)
    return F.interpolate(grid, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]


def run(model: nn.Module, method: str, x: torch.Tensor, targets: list[int], **params: object):
    spec = get_method(method)
    info = find_attention(model, (3, SIZE, SIZE))
    ctx = ExplainContext(model=model, attention=info)
    return spec.fn(ctx, x, torch.tensor(targets), **spec.resolve_params(params)).maps


@pytest.mark.parametrize("name", VITS)
def test_capture_records_the_explicit_probabilities_and_changes_nothing(name: str) -> None:
    model = served(name)
    x = torch.rand(2, 3, SIZE, SIZE, dtype=torch.float64)
    want_logits, want = explicit_forward(model, x)
    plain = model(x)
    with capture_attention() as capture:
        logits = model(x)
    torch.testing.assert_close(plain, want_logits, rtol=RTOL, atol=0)  # the reference holds
    torch.testing.assert_close(logits, plain, rtol=RTOL, atol=0)
    assert len(capture.calls) == len(want) == 2
    for call, expected in zip(capture.calls, want, strict=True):
        torch.testing.assert_close(call.view(), expected, rtol=RTOL, atol=1e-15)
    assert not torch._C._is_torch_function_mode_enabled()


@pytest.mark.parametrize("name", VITS)
def test_attention_gradients_are_exact(name: str) -> None:
    """``d logit / d P`` through the captured tensors equals the explicit model's."""
    model = served(name)
    x = torch.rand(2, 3, SIZE, SIZE, dtype=torch.float64, requires_grad=True)
    logits, want = explicit_forward(model, x)
    want_grads = torch.autograd.grad(logits[:, 1].sum(), want)
    with capture_attention() as capture:
        captured = model(x)
    grads = torch.autograd.grad(captured[:, 1].sum(), [c.probs for c in capture.calls])
    for call, grad, expected in zip(capture.calls, grads, want_grads, strict=True):
        scale = float(expected.abs().max())
        assert scale > 0
        torch.testing.assert_close(call.view(grad), expected, rtol=RTOL, atol=1e-12 * scale)


@pytest.mark.parametrize("name", VITS)
def test_gradient_weighted_attention_is_chefers_relevance(name: str) -> None:
    model = served(name)
    x = torch.rand(3, 3, SIZE, SIZE, dtype=torch.float64)
    targets = [1, 4, 0]
    leaf = x.clone().requires_grad_(True)
    logits, probs = explicit_forward(model, leaf)
    grads = torch.autograd.grad(logits[torch.arange(3), targets].sum(), probs)
    tokens = probs[0].shape[-1]
    relevance = torch.eye(tokens, dtype=torch.float64).repeat(3, 1, 1)
    for p, g in zip(probs, grads, strict=True):
        relevance = relevance + F.relu(g * p).mean(dim=1) @ relevance  # eq. 5-6
    prefix = 1 if name == "vit_s16" else 5
    want = to_image(relevance, readout(name, tokens), prefix).detach()
    got = run(model, "gradient_weighted_attention", x, targets)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-12 * float(want.abs().max()))


def lowest_dropped(fused: torch.Tensor, ratio: float) -> torch.Tensor:
    """Each image's lowest ``ratio`` of entries set to 0, entry (0, 0) kept."""
    out = fused.clone()
    for image in out:
        flat = image.view(-1)
        order = torch.sort(flat).indices[: int(flat.numel() * ratio)]
        keep = flat[0].clone()
        flat[order] = 0
        flat[0] = keep
    return out


@pytest.mark.parametrize("discard_ratio", [0.0, 0.6])
@pytest.mark.parametrize("name", VITS)
def test_attention_rollout_is_abnar_and_zuidemas(name: str, discard_ratio: float) -> None:
    model = served(name)
    x = torch.rand(2, 3, SIZE, SIZE, dtype=torch.float64)
    _, probs = explicit_forward(model, x)
    tokens = probs[0].shape[-1]
    eye = torch.eye(tokens, dtype=torch.float64)
    rollout = eye.repeat(2, 1, 1)
    for p in probs:
        a = lowest_dropped(p.mean(dim=1), discard_ratio) + eye  # heads' mean, residual
        rollout = (a / a.sum(dim=-1, keepdim=True)) @ rollout
    want = to_image(rollout, readout(name, tokens), 1 if name == "vit_s16" else 5)
    for targets in ([1, 2], [3, 0]):  # the class does not matter, by definition
        got = run(model, "attention_rollout", x, targets, discard_ratio=discard_ratio)
        torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-12 * float(want.abs().max()))


class Raising(nn.Module):
    """Raises after its attention ran: hooks and the capture must still go away."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.model(x)
        raise RuntimeError("model failed after its attention")


@pytest.mark.parametrize("method", ["attention_rollout", "gradient_weighted_attention"])
@pytest.mark.parametrize("name", VITS)
def test_nothing_is_left_behind_when_the_model_raises(name: str, method: str) -> None:
    model = served(name, torch.float32)
    info = find_attention(model, (3, SIZE, SIZE))
    assert all_hooks(model) == [] and not torch._C._is_torch_function_mode_enabled()
    raising = Raising(model)
    spec = get_method(method)
    ctx = ExplainContext(model=raising, attention=info)
    with pytest.raises(RuntimeError, match="after its attention"):
        spec.fn(ctx, torch.rand(1, 3, SIZE, SIZE), torch.tensor([1]), **spec.defaults)
    assert all_hooks(model) == [] and not torch._C._is_torch_function_mode_enabled()
    with pytest.raises(RuntimeError, match="after its attention"):
        find_attention(raising, (3, SIZE, SIZE))
    assert all_hooks(raising) == [] and not torch._C._is_torch_function_mode_enabled()


def test_a_capture_sees_only_its_own_threads_forwards() -> None:
    """Thread A captures while thread B runs the same model: B's attention stays fused and
    unrecorded, A records exactly its own two layers, and both get the right logits."""
    model = served("vit_s16_sdpa_reg4", torch.float32)
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        want = model(x)
    inside, other_done = threading.Event(), threading.Event()
    other: list[torch.Tensor] = []

    def other_thread() -> None:
        inside.wait(10)
        with torch.no_grad():
            other.append(model(x))
        other_done.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with torch.no_grad(), capture_attention() as capture:
        inside.set()
        assert other_done.wait(10)
        mine = model(x)
    worker.join()
    assert len(capture.calls) == 2
    torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(other[0], want, rtol=1e-5, atol=1e-6)


class BatchFirstVit(nn.Module):
    """``nn.TransformerEncoder`` with ``batch_first=True``: its fused fast path runs
    without autograd unless a capture is active."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 16, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(x), -1, -1), t], dim=1)
        return self.head(self.encoder(t)[:, 0])


class HandWritten(nn.Module):
    """Attention written out with ``nn.Softmax``, as in vit-pytorch; an average-pooled head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Conv2d(3, 8, 8, stride=8)
        self.qkv = nn.Linear(8, 24)
        self.attend = nn.Softmax(dim=-1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        q, k, v = (p.unflatten(-1, (2, 4)).transpose(1, 2) for p in self.qkv(t).chunk(3, -1))
        out = self.attend(q @ k.transpose(-2, -1) * 0.5) @ v
        return self.head(out.transpose(1, 2).flatten(2).mean(dim=1))


@pytest.mark.parametrize(
    ("net", "how"),
    [(BatchFirstVit, "2 self-attention layers"), (HandWritten, "1 self-attention layers")],
    ids=["batch_first_transformer_encoder", "hand_written_softmax"],
)
def test_other_ways_of_writing_attention_are_captured(net: type[nn.Module], how: str) -> None:
    model = freeze(net())
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        fast = model(x)  # fast path where the model has one
        with capture_attention() as capture:
            slow = model(x)
    torch.testing.assert_close(slow, fast, rtol=1e-5, atol=1e-6)
    assert capture.calls and all(
        c.shape[0] == 2 and c.shape[2] == 17 - (net is HandWritten) for c in capture.calls
    )
    engine = Engine(model, attention="auto", input_shape=(3, SIZE, SIZE))
    assert engine.attention is not None and engine.attention.how.startswith(how)
    for method in ("attention_rollout", "gradient_weighted_attention"):
        maps = engine.explain(x, [1, 2], method).maps
        assert maps.shape == (2, SIZE, SIZE) and bool(torch.isfinite(maps).all())
        assert float(maps.amax()) > 0


def test_need_weights_callers_get_what_they_asked_for() -> None:
    torch.manual_seed(0)
    mha = freeze(nn.MultiheadAttention(8, 2, batch_first=True))
    x = torch.rand(2, 5, 8)
    for kwargs in ({}, {"average_attn_weights": False}, {"need_weights": False}):
        want = mha(x, x, x, **kwargs)
        with capture_attention() as capture:
            got = mha(x, x, x, **kwargs)
        assert len(capture.calls) == 1
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        if want[1] is None:
            assert got[1] is None
        else:
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_where_attention_cannot_be_read_the_reason_is_given() -> None:
    cnn = served("resnet18", torch.float32)
    with pytest.raises(UnsupportedMethodError, match="no attention layers"):
        find_attention(cnn, (3, SIZE, SIZE))
    # The two-halves model runs each image as two sequences: its attention has no place
    # on the image.
    halves = two_halves_engine("vit_s16")
    with pytest.raises(UnsupportedMethodError, match="split over several sequences"):
        find_attention(halves.model, (3, 64, 64))
    engine = Engine(cnn, attention="auto", input_shape=(3, SIZE, SIZE))
    assert engine.attention is None
    with pytest.raises(UnsupportedMethodError, match="unavailable for this model: no attention"):
        engine.explain(torch.rand(1, 3, SIZE, SIZE), [1], "attention_rollout")


def test_attention_info_round_trips_through_json() -> None:
    info = find_attention(served("vit_s16_sdpa_reg4"), (3, SIZE, SIZE))
    assert AttentionInfo.from_json(info.to_json()) == info
    assert info.readout == tuple(range(5, 5 + 16)) and info.grid == (4, 4)
    assert [layer.module for layer in info.layers] == ["model.blocks.0.attn", "model.blocks.1.attn"]
    with pytest.raises(ValueError, match="inconsistent"):
        AttentionInfo.from_json({**info.to_json(), "tokens": 99})
