"""Small models shared by the tests: each exercises a site form or a capture path. Fixtures, not tests:
the test_*.py modules import them and assert on what tunecomp makes of them; pytest does not collect
this module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Two nn.Linear sites and one F.linear site on a parameter."""

    def __init__(self, width: int = 64, hidden: int = 96, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head_weight = nn.Parameter(torch.randn(classes, hidden) / hidden**0.5)
        self.head_bias = nn.Parameter(torch.zeros(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x)) + x
        return F.linear(x, self.head_weight, self.head_bias)


class AttentionBlock(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attention = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attention.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(x)))


class SharedLayerEncoder(nn.Module):
    """One AttentionBlock applied `depth` times, as ALBERT shares its layer, then a classifier: each of
    the block's layers is one weight that `depth` linear calls apply."""

    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.depth = depth
        self.block = AttentionBlock(dim, heads)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.depth):
            x = self.block(x)
        return self.head(x.mean(1))


class RelativeKeys(nn.Module):
    """Attention whose key projection is applied to the tokens and to relative position embeddings
    (a parameter of `span` rows, no batch), which the scores add, as DeBERTa-v2's key_proj."""

    def __init__(self, dim: int = 64, span: int = 16) -> None:
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.relative = nn.Parameter(torch.randn(span, dim) / dim**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        q, k, v = self.query(x), self.key(x), self.value(x)
        positions = self.key(self.relative)[:t]
        scores = (q @ k.transpose(-2, -1) + q @ positions.transpose(-2, -1)) * q.shape[-1] ** -0.5
        return self.out(scores.softmax(-1) @ v)


class HeadsBlock(nn.Module):
    """Separate query, key, value and output projections around scaled_dot_product_attention, as in
    Hugging Face's BERT. `literal_heads` writes the head count into the views (a symbolic trace keeps
    it); otherwise the views infer it (-1), and a shape test makes symbolic tracing fail, so that the
    capture goes through torch.export, as MiniLM's does. `written_out` computes the attention with
    matmuls and an nn.Softmax instead (the mask filled into the scaled scores, a dropout on the weights)."""

    def __init__(self, dim: int = 64, heads: int = 4, literal_heads: bool = True, written_out: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim, self.literal_heads, self.written_out = heads, dim // heads, literal_heads, written_out
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.norm = nn.LayerNorm(dim)
        self.softmax, self.dropout = nn.Softmax(dim=-1), nn.Dropout(0.1)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if not self.written_out:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.head_dim**-0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(self.dropout(self.softmax(scores)), v)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        if not self.literal_heads and x.shape[-1] < 0:  # a proxy bool: symbolic tracing cannot evaluate this
            raise ValueError("negative width")
        heads = self.heads if self.literal_heads else -1
        q, k, v = (layer(x).view(b, t, heads, self.head_dim).transpose(1, 2) for layer in (self.query, self.key, self.value))
        context = self.attention(q, k, v, mask).transpose(1, 2)
        merged = context.reshape(b, t, self.heads * self.head_dim if self.literal_heads else -1)
        return self.norm(x + self.out(merged))


class RotaryHeadsBlock(HeadsBlock):
    """A HeadsBlock (captured with torch.export) whose query and key get rotary embeddings between the
    head split and the attention, as LLaMA's do; with `head_scale`, the query is also scaled per head
    by a (heads, 1, 1) parameter, which pruned heads would leave unmatched."""

    def __init__(self, head_scale: bool = False, seq: int = 10) -> None:
        super().__init__(literal_heads=False)
        angles = torch.outer(torch.arange(seq, dtype=torch.float32), 1.0 / 100.0 ** (torch.arange(0, self.head_dim, 2) / self.head_dim))
        self.register_buffer("cos", torch.cat([angles, angles], dim=-1).cos())
        self.register_buffer("sin", torch.cat([angles, angles], dim=-1).sin())
        self.scale = nn.Parameter(torch.rand(self.heads, 1, 1) + 0.5) if head_scale else None

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * self.cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * self.sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        if x.shape[-1] < 0:  # a proxy bool: symbolic tracing cannot evaluate this
            raise ValueError("negative width")
        q, k, v = (layer(x).view(b, t, -1, self.head_dim).transpose(1, 2) for layer in (self.query, self.key, self.value))
        q, k = self._rotate(q), self._rotate(k)
        if self.scale is not None:
            q = q * self.scale
        context = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return self.norm(x + self.out(context.reshape(b, t, -1)))


class NormedHeadsBlock(HeadsBlock):
    """A HeadsBlock (captured with torch.export) whose query and key are RMS-normalized over each head's
    head_dim between the head split and the swap, as Qwen3's q_norm and k_norm; the norm's weight is
    one for all heads, or with `weight_per_head` one per head (heads, head_dim), which pruned heads would
    leave unmatched."""

    def __init__(self, weight_per_head: bool = False) -> None:
        super().__init__(literal_heads=False)
        self.weight = nn.Parameter(torch.rand((self.heads, self.head_dim) if weight_per_head else (self.head_dim,)) + 0.5)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        if x.shape[-1] < 0:  # a proxy bool: symbolic tracing cannot evaluate this
            raise ValueError("negative width")
        q, k, v = (layer(x).view(b, t, -1, self.head_dim) for layer in (self.query, self.key, self.value))
        q, k, v = (h.transpose(1, 2) for h in (self._norm(q), self._norm(k), v))
        context = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return self.norm(x + self.out(context.reshape(b, t, -1)))


class GroupedQueryAttention(nn.Module):
    """8 query heads of 8 sharing `key_value_heads` key/value heads (4: in pairs) inside
    scaled_dot_product_attention (enable_gqa=True), captured with torch.export. `fused=True` takes
    query, key and value from one site, qkv(x).split([64, kv, kv], dim=-1)."""

    def __init__(self, key_value_heads: int = 4, fused: bool = False) -> None:
        super().__init__()
        self.sizes = [64, 8 * key_value_heads, 8 * key_value_heads]
        self.fused = fused
        if fused:
            self.qkv = nn.Linear(64, sum(self.sizes))
        else:
            self.query, self.key, self.value = (nn.Linear(64, size) for size in self.sizes)
        self.out = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        if x.shape[-1] < 0:  # a proxy bool: symbolic tracing cannot evaluate this
            raise ValueError("negative width")
        parts = self.qkv(x).split(self.sizes, dim=-1) if self.fused else (layer(x) for layer in (self.query, self.key, self.value))
        q, k, v = (part.view(b, t, -1, 8).transpose(1, 2) for part in parts)
        return self.out(F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2).reshape(b, t, -1))


class FusedHeadsBlock(nn.Module):
    """One fused qkv projection split into heads as timm's ViT splits it (reshape (b, t, 3, heads,
    head_dim), permute(2, 0, 3, 1, 4), unbind(0)), with its identity q_norm, k_norm and norm, and an
    output projection `out`. `unbind=False` unpacks the parts instead (`q, k, v = x`); `export=True`
    makes symbolic tracing fail, so that the capture goes through torch.export; `infer_head_dim=True`
    leaves the head size to the reshape (-1), as timm's BEiT does."""

    def __init__(self, dim: int = 64, heads: int = 4, unbind: bool = True, export: bool = False, infer_head_dim: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim, self.unbind, self.export = heads, dim // heads, unbind, export
        self.split_head_dim = -1 if infer_head_dim else self.head_dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm, self.norm = nn.Identity(), nn.Identity(), nn.Identity()
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        if self.export and x.shape[-1] < 0:  # a proxy bool: symbolic tracing cannot evaluate this
            raise ValueError("negative width")
        parts = self.qkv(x).reshape(b, t, 3, self.heads, self.split_head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = parts.unbind(0) if self.unbind else parts
        context = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v).transpose(1, 2)
        return x + self.out(self.norm(context.reshape(b, t, self.heads * self.head_dim)))


class MultiheadSelfAttention(nn.Module):
    """nn.MultiheadAttention over one sequence (its packed in-projection `attn.in_proj_weight`, output
    projection `attn.out_proj`), with a key padding mask if given, which the module expands over its
    heads. Symbolic tracing keeps the module a leaf, so the capture goes through torch.export."""

    def __init__(self, dim: int = 64, heads: int = 4, batch_first: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]


class CrossAttention(nn.Module):
    """Queries from x, keys and values from `memory` (split rows) or keys from x + pos and values from x (chunked rows)."""

    def __init__(self, chunked: bool) -> None:
        super().__init__()
        self.attn, self.chunked = nn.MultiheadAttention(64, 4, batch_first=True), chunked

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        query, key, value = (x + memory, x + memory, x) if self.chunked else (x, memory, memory)
        return self.attn(query, key, value, need_weights=False)[0]


class ActivatedMLP(nn.Module):
    """Linear -> `activation` -> Linear; `export=True` makes symbolic tracing fail, so that the
    capture goes through torch.export (which records the activation as an aten op)."""

    def __init__(self, activation: nn.Module, export: bool = False) -> None:
        super().__init__()
        self.up, self.activation, self.down, self.export = nn.Linear(16, 64), activation, nn.Linear(64, 16), export

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.export and x.shape[-1] < 0:  # a proxy bool: symbolic tracing cannot evaluate this
            raise ValueError("negative width")
        return self.down(self.activation(self.up(x)))


class WrittenOutGelu(nn.Module):
    """fc1 -> GELU's tanh approximation written out in arithmetic (as GPT-2 writes it) -> tokens
    flattened to (-1, 128) -> fc2; with `gated`, the activation times a second projection of the
    input, `gate` (as in SwiGLU)."""

    def __init__(self, gated: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 64)
        self.gate = nn.Linear(64, 128) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = 0.5 * h * (1.0 + torch.tanh(0.7978845608 * (h + 0.044715 * torch.pow(h, 3.0))))
        if self.gate is not None:
            h = h * self.gate(x)
        return self.fc2(h.reshape(-1, 128)).view(x.shape)


def silent_heads(fused: bool = False, written_out: bool = False) -> HeadsBlock | FusedHeadsBlock:
    """A HeadsBlock (or FusedHeadsBlock; a HeadsBlock with its attention written out) whose output
    projection (bias-free) ignores heads 1 and 3: they change nothing."""
    torch.manual_seed(0)
    model = (FusedHeadsBlock() if fused else HeadsBlock(written_out=written_out)).eval()
    model.out = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        model.out.weight.view(64, 4, 16)[:, [1, 3]] = 0.0
    return model


# Half of silent_heads' heads pruned: query/key/value keep 32 rows and their biases, the output 32
# columns and its student's bias; the ratio at which that is the budget, so every site stays whole.
SILENT_HEADS_KEPT = 3 * (32 * 64 + 32) + (64 * 32 + 64)
SILENT_HEADS_RATIO = 1 - SILENT_HEADS_KEPT / (3 * (64 * 64 + 64) + 64 * 64)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: a pointwise convolution expands the channels, batch norms and a depthwise
    convolution map each channel by itself, a pointwise convolution projects back. `groups` of the
    middle convolution: None a group per channel (depthwise), 1 a dense 3 x 3 mixing the channels, else
    grouped (RegNet's and ResNeXt's, each group of channels by itself); with `checked` a check of the
    expanded shape, as timm's blocks make, leaves symbolic tracing to fail and torch.export to capture
    it (functional batch norms and convolutions on the graph's tensors); with `gated` a
    squeeze-excitation (EfficientNet's) multiplies the expanded channels by gates computed from their
    means by two pointwise convolutions."""

    def __init__(self, channels: int = 16, hidden: int = 64, groups: int | None = None, checked: bool = False, gated: bool = False) -> None:
        super().__init__()
        self.checked = checked
        self.gates = nn.Sequential(nn.Conv2d(hidden, hidden // 4, 1), nn.ReLU(), nn.Conv2d(hidden // 4, hidden, 1), nn.Sigmoid()) if gated else None
        self.expand = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(hidden), nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden if groups is None else groups, bias=False)
        self.project = nn.Conv2d(hidden, channels, 1)
        for norm in (self.bn1, self.bn2):  # statistics and affine maps worth slicing
            nn.init.normal_(norm.weight)
            nn.init.normal_(norm.bias)
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(x)
        if self.checked and h.shape[1] != self.dw.in_channels:  # a proxy bool: symbolic tracing cannot evaluate this
            raise ValueError(f"expected {self.dw.in_channels} channels, got {h.shape[1]}")
        h = F.relu6(self.bn2(self.dw(F.relu6(self.bn1(h)))))
        if self.gates is not None:
            h = h * self.gates(h.mean((2, 3), keepdim=True))
        return x + self.project(h)


class TokenConvMlp(nn.Module):
    """PVT v2's (and SegFormer's) FFN: fc1 on tokens, the hidden width swapped to channels and viewed as
    an image (x.transpose(1, 2).view(B, C, H, W), B and C read from the shape), a depthwise convolution,
    flattened and swapped back, GELU, fc2. With `size_read_outside` the width's size is also used after
    fc2, outside the FFN."""

    def __init__(self, dim: int = 16, hidden: int = 64, side: int = 4, size_read_outside: bool = False) -> None:
        super().__init__()
        self.side, self.size_read_outside = side, size_read_outside
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        b, _, c = h.shape
        h = self.dwconv(h.transpose(1, 2).view(b, c, self.side, self.side)).flatten(2).transpose(1, 2)
        out = x + self.fc2(F.gelu(h))
        return out * (c / c) if self.size_read_outside else out


class ShapeBranching(nn.Module):
    """Python control flow on a tensor value: symbolic tracing fails, torch.export handles it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if h.shape[-1] > 16:  # a proxy bool: symbolic tracing cannot evaluate this
            h = torch.relu(h)
        return self.fc2(h)


class Gain(nn.Module):
    """A user's own layer, registered as a leaf module by the tests that use it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.gain


def soft_clip(h: torch.Tensor) -> torch.Tensor:
    """A user's own function, registered as a wrapped function by the tests that use it."""
    return 3 * torch.tanh(h / 3)


class UserLeaves(nn.Module):
    """An MLP with a user's leaf module and a user's function between its linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 96)
        self.gain = Gain(96)
        self.fc2 = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(soft_clip(self.gain(self.fc1(x))))


class NoLinear(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * 2


def anisotropic_inputs(batch: int, width: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose channel scales span three orders of magnitude."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, width, generator=generator) * torch.logspace(-1.5, 1.5, width)


class TiedLanguageModel(nn.Module):
    """An embedding tied to the output head (compressed with its lookup), and one linear applied twice (one site)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.mix = nn.Linear(32, 32)
        self.fc = nn.Linear(32, 64)
        self.back = nn.Linear(64, 32)
        self.head = nn.Linear(32, 100, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.mix(self.mix(self.embed(ids)))
        return self.head(self.back(torch.relu(self.fc(h))))


class SharedVocabulary(nn.Module):
    """T5's layout: one table looked up by F.embedding for two token inputs and tied to the output head (F.linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Parameter(torch.randn(100, 32) / 32**0.5)
        self.mix = nn.Linear(64, 32)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        context = F.embedding(source, self.shared).mean(1, keepdim=True).expand(-1, target.shape[1], -1)
        h = torch.tanh(self.mix(torch.cat([F.embedding(target, self.shared), context], -1)))
        return F.linear(h, self.shared)


class TokenClassifier(nn.Module):
    """A vocabulary table (more rows than features: a site with compress_embeddings) and a position
    table (fewer: never one), then an MLP and a classifier over the mean token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.position = nn.Embedding(10, 16)
        self.fc = nn.Linear(16, 64)
        self.back = nn.Linear(64, 16)
        self.classifier = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))
        return self.classifier(self.back(torch.relu(self.fc(h))).mean(1))
