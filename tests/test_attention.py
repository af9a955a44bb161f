import math

import pytest
import torch

from memlong.attention import joint_attention, rotate, unrotate


def naive(q, k, v, n_visible, scaling):
    """Loop-by-loop joint softmax in float64: memory/prefix visible to all, the rest causal."""
    b, h, lq, d = q.shape
    groups = h // k.shape[1]
    out = torch.zeros(b, h, lq, d, dtype=torch.float64)
    for head in range(h):
        kh, vh = k[:, head // groups].double(), v[:, head // groups].double()
        for i in range(lq):
            visible = n_visible + i + 1
            s = (q[:, head, i : i + 1].double() @ kh[:, :visible].transpose(-1, -2)) * scaling
            out[:, head, i] = (torch.softmax(s, -1) @ vh[:, :visible])[:, 0]
    return out


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize("lq, n_visible", [(7, 0), (7, 5), (1, 9), (16, 32), (16, 1), (16, 8)])
def test_backends_equal_exact_joint_softmax(backend, lq, n_visible):
    torch.manual_seed(lq + n_visible)
    q = torch.randn(1, 6, lq, 16)
    k = torch.randn(1, 2, n_visible + lq, 16)  # GQA: 3 query heads per KV head
    v = torch.randn(1, 2, n_visible + lq, 16)
    out = joint_attention(q, k, v, n_visible, 1 / math.sqrt(16), backend)
    assert out.shape == (1, 6, lq, 16)
    torch.testing.assert_close(out.double(), naive(q, k, v, n_visible, 1 / math.sqrt(16)), atol=1e-5, rtol=1e-5)


def test_one_softmax_not_two():
    """Adding a memory key must renormalise the local weights (a sum of two softmaxes would not)."""
    q = torch.ones(1, 1, 1, 4)
    local_k, local_v = torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4)
    mem_k, mem_v = torch.zeros(1, 1, 1, 4), torch.ones(1, 1, 1, 4)
    out = joint_attention(q, torch.cat([mem_k, local_k], 2), torch.cat([mem_v, local_v], 2), 1, 1.0, "sdpa")
    assert torch.allclose(out, torch.full_like(out, 0.5))  # equal scores: half from memory, half local


def test_key_count_is_checked():
    with pytest.raises(ValueError, match="visible"):
        joint_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), 1, 1.0)


def test_unrotate_inverts_rotate():
    x = torch.randn(1, 2, 5, 8)
    angles = torch.arange(5)[:, None] * torch.linspace(0.1, 1.0, 4)[None]
    emb = torch.cat([angles, angles], -1)[None]
    cos, sin = emb.cos() * 1.3, emb.sin() * 1.3  # a scaled RoPE variant (e.g. YaRN's attention factor)
    torch.testing.assert_close(unrotate(rotate(x, cos, sin), cos, sin), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_lower_right_causal_bias_is_the_same_mask(heads, kv_heads):
    """CUDA runs the mask as SDPA's lower-right causal bias (fast kernels); here both forms run on the CPU."""
    from memlong.attention import _attention_sdpa

    torch.manual_seed(0)
    q = torch.randn(1, heads, 7, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, kv_heads, 20 + 7, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, kv_heads, 20 + 7, 16, dtype=torch.float64, requires_grad=True)
    outs, grads = [], []
    for lower_right in (False, True):
        out = _attention_sdpa(q, k, v, 20, 0.25, lower_right=lower_right)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    reference = joint_attention(q, k, v, 20, 0.25, backend="eager")
    torch.testing.assert_close(outs[1], reference, atol=1e-5, rtol=1e-5)  # the reference runs in float32


@pytest.mark.parametrize("lq, n_visible", [(16, 1), (16, 8), (9, 4)])
def test_short_prefix_padded_causal_is_the_same_mask(lq, n_visible):
    """A short visible prefix runs as plain causal SDPA over zero-padded queries (the CPU fast path of ingest
    steps): same outputs and gradients as the boolean mask, with and without GQA."""
    from memlong.attention import _attention_sdpa, _causal_padded

    torch.manual_seed(lq)
    for kv_heads in (4, 2):
        q = torch.randn(1, 4, lq, 16, dtype=torch.float64, requires_grad=True)
        k = torch.randn(1, kv_heads, n_visible + lq, 16, dtype=torch.float64, requires_grad=True)
        v = torch.randn(1, kv_heads, n_visible + lq, 16, dtype=torch.float64, requires_grad=True)
        padded = _attention_sdpa(q, k, v, n_visible, 0.25)  # 2 * n_visible <= lq: the padded path
        direct = _causal_padded(q, k, v, n_visible, 0.25, 0.0, 4 // kv_heads)
        torch.testing.assert_close(padded, direct)
        masked = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.ones(lq, n_visible + lq, dtype=torch.bool).tril(n_visible), scale=0.25,
            enable_gqa=kv_heads != 4)
        torch.testing.assert_close(padded, masked)
        for a, b in zip(torch.autograd.grad(padded.square().sum(), (q, k, v)),
                        torch.autograd.grad(masked.square().sum(), (q, k, v))):
            torch.testing.assert_close(a, b)


def test_rotate_is_the_models_rope_formula_bit_for_bit_also_into_a_buffer():
    """rotate() writes with half-size temporaries (and into ``out``); it must equal x*cos + rotate_half(x)*sin,
    the formula transformers' Llama applies to the local tokens, exactly: stored and fresh keys meet in one softmax."""
    from transformers.models.llama.modeling_llama import rotate_half

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 40, 16, generator=g)
    angles = torch.randn(1, 40, 8, generator=g)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    expected = x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)
    assert torch.equal(rotate(x, cos, sin), expected)
    buffer = torch.full((3, 2, 50, 16), float("nan"))
    rotate(x, cos, sin, out=buffer[:, :, :40])
    assert torch.equal(buffer[:, :, :40], expected) and buffer[:, :, 40:].isnan().all()


def test_memory_prefix_equals_rotating_each_layer_on_its_own():
    """positions._add_memory writes every retrieval layer's rotated memory (one source rotated once in memory_layer
    mode, a view of contiguous source layers in per_layer mode) in front of the local part; compared with the plain
    per-layer computation, bit for bit."""
    import types

    from memlong import positions

    g = torch.Generator().manual_seed(1)
    memory = (torch.randn(4, 2, 24, 8, generator=g), torch.randn(4, 2, 24, 8, generator=g))
    local = (torch.randn(6, 2, 3, 8, generator=g), torch.randn(6, 2, 3, 8, generator=g))
    angles = torch.randn(1, 24, 4, generator=g)
    table = (torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1))
    for source_index, layers in ((lambda layer: layer - 2, [2, 3, 4, 5]), (lambda layer: 0, [3, 4, 5]),
                                 (lambda layer: [0, 2, 3][layer - 3], [3, 4, 5])):
        for with_local in (local, None):
            ml = types.SimpleNamespace(config=types.SimpleNamespace(retrieval_layers=layers, source_index=source_index))
            prefix = {}
            with torch.no_grad():
                positions._add_memory(ml, memory, table, with_local, prefix)
            assert sorted(prefix) == layers
            for layer in layers:
                src = source_index(layer)
                keys = rotate(memory[0][src:src + 1], *table)
                values = memory[1][src:src + 1]
                if with_local is not None:
                    keys = torch.cat([keys, local[0][layer:layer + 1]], 2)
                    values = torch.cat([values, local[1][layer:layer + 1]], 2)
                assert torch.equal(prefix[layer][0], keys) and torch.equal(prefix[layer][1], values)


def test_flex_trains_on_a_cpu_and_refresh_builds_no_graph(make_tiny):
    """Matrix review: with ``attention_backend="flex"`` every forward with gradients on a CPU failed inside torch
    ("FlexAttention does not support backward on CPU"; train() only after its eval); ``ml.refresh`` outside
    ``no_grad`` (as docs/api.md writes it) built an autograd graph for nothing."""
    ids = torch.randint(3, 5000, (1, 40))
    losses = {}
    for backend in ("flex", "sdpa"):
        ml, _ = make_tiny(attention_backend=backend, chunk_size=16, local_window=64)
        ml.ingest(" ".join(f"word{i}" for i in range(200)), namespace="d", progress=False)
        loss = ml.forward(ids, labels=ids, namespace="d", chunk_ids=ml.bank.chunk_ids("d")[:2])["loss"]
        loss.backward()
        losses[backend] = loss.item()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ml.model.parameters())
        ml.model.zero_grad()
    assert abs(losses["flex"] - losses["sdpa"]) < 1e-4
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 8, 8)  # only V trained (LoRA on v_proj): diff review
    v = torch.randn(1, 2, 8, 8, requires_grad=True)
    joint_attention(q, k, v, 3, 0.3, "flex").sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    ml, _ = make_tiny(chunk_size=16, local_window=64)
    ids = ml.ingest(" ".join(f"word{i}" for i in range(200)), namespace="d", progress=False).chunk_ids[:2]
    memory, count = ml.refresh(ml.memory_for(ids, "d"), ids, "d", share=0.5)
    assert count > 0 and not memory[0].requires_grad and memory[0].grad_fn is None
