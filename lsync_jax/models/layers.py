"""Building blocks shared by the diffusion backbones: embeddings, adaLN, attention, MLP.

Everything here follows the official DiT/SiT PyTorch code (facebookresearch/DiT,
willisma/SiT) so that official checkpoints map onto these parameters one to one.
"""

from __future__ import annotations

import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# The official code initialises every nn.Linear with xavier-uniform and a zero bias.
xavier_uniform = nn.initializers.xavier_uniform()
# The official patch embedding initialises the conv weight "like nn.Linear": xavier over the
# flattened (p * p * C_in) -> hidden matrix, not over the conv receptive field.
patch_embed_init = nn.initializers.variance_scaling(
    1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1
)
# muP (the muP-DiT code, ML-GSAI): every Linear/patch weight, input or hidden, N(0, 1/fan_in), as
# torch's kaiming_normal_(a=1, mode='fan_in'); 'sp' keeps the official DiT initialisers above.
PARAMETRIZATIONS = ("sp", "mup")
fan_in_normal = nn.initializers.variance_scaling(1.0, "fan_in", "normal")

# How `Dense` and `Attention` lay out their work: 'accelerator' is flax's own computation (what GPUs
# and TPUs run); 'cpu' multiplies rows and splits attention heads-first (XLA:CPU's backward pass, see
# `Dense`). A compute field of every backbone: the builders resolve it from the platform of the mesh's
# devices (`resolve_layout`), so a program compiled for a TPU on a CPU host is traced on the TPU path.
LAYOUTS = ("accelerator", "cpu")


def resolve_layout(platform: str) -> str:
    """The layout for devices of `platform` ('cpu', 'gpu', 'tpu', ...)."""
    return "cpu" if platform == "cpu" else "accelerator"


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"model.layout={layout!r}; expected one of {LAYOUTS} (None in a config: from the platform "
                         "of the mesh's devices)")


# Activation rematerialisation of the transformer blocks (the model's `remat` field): 'none' keeps
# every activation for the backward pass; 'blocks' keeps only each block's input and recomputes the
# rest (about a third more FLOPs); 'dots' keeps the linears' outputs and recomputes the cheap
# element-wise work and attention's batched products. True and False mean 'blocks' and 'none'.
REMAT_POLICIES = ("none", "blocks", "dots")


def remat_policy(remat: Any) -> str:
    """The policy named by a model's `remat` field (a bool, a policy name, or their command-line strings)."""
    if isinstance(remat, bool) or remat in ("True", "False", "true", "false"):
        return "blocks" if remat in (True, "True", "true") else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat={remat!r}; expected one of {REMAT_POLICIES} (or True = 'blocks', "
                         "False = 'none')")
    return remat


def remat_block(block_cls: type, remat: Any) -> type:
    """`block_cls` wrapped for the `remat` policy (the class itself for 'none'). The blocks' outputs
    that the regularisers read are sown by the backbone outside the wrapped block, so every policy
    sows the same features."""
    policy = remat_policy(remat)
    if policy == "none":
        return block_cls
    if policy == "dots":
        return nn.remat(block_cls, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return nn.remat(block_cls)



@jax.custom_jvp
def _add_row_bias(rows: jax.Array, bias: jax.Array) -> jax.Array:
    """rows (R, F) + bias (F,), whose bias gradient is a matrix-vector product, not a reduction.

    Why: XLA:CPU rewrites a long sum into a tree of windowed reductions that walk the rows with a
    stride; a bias gradient of a (3136, 768) SiT activation took 5 ms that way, 0.3 ms as ones @ g.
    The tangent of the bias is written as an outer product with ones, so its transpose (the
    gradient) is that product's adjoint.
    """
    return rows + bias


@_add_row_bias.defjvp
def _add_row_bias_jvp(primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, jax.Array]):
    rows, bias = primals
    rows_dot, bias_dot = tangents
    ones = jnp.ones((rows.shape[0], 1), bias_dot.dtype)
    return rows + bias, rows_dot + ones @ bias_dot[None, :]


class Dense(nn.Dense):
    """flax's nn.Dense (the same fields, parameters and initialisers), laid out for XLA:CPU's backward pass.

    On CPU, a (..., in) input is multiplied as one (rows, in) matrix, and the bias is added by
    `_add_row_bias`. Why: autodiff's weight gradient of an (N, T, in) input contracts over two axes,
    and XLA:CPU's dot canonicalisation then transposes an activation-sized operand in every backward
    Dense; as rows it contracts over one axis, which the CPU matmul takes transposed without a copy.
    Together these cut the CPU train step of a small SiT by about a fifth (docs/benchmarks.md).
    Other backends take flax's own computation: TPU tiles the last two axes, so a flatten there can
    itself be a copy. It computes its own matmul, so flax's `dot_general` and `dot_general_cls` fields
    are refused (use flax's nn.Dense for those). `layout` ('accelerator' or 'cpu', see `LAYOUTS`)
    chooses; the two agree to float rounding.
    """

    layout: str = "accelerator"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        for field in ("dot_general", "dot_general_cls"):
            if getattr(self, field) is not None:
                raise ValueError(f"lsync_jax.models.layers.Dense computes its own matmul and does not take "
                                 f"{field}={getattr(self, field)!r}; use flax.linen.Dense for a custom {field}")
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        check_layout(self.layout)
        if self.layout != "cpu" or inputs.ndim < 2:
            y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
            return y if bias is None else y + bias
        rows = jnp.dot(inputs.reshape(-1, inputs.shape[-1]), kernel, precision=self.precision)
        if bias is not None:
            rows = _add_row_bias(rows, bias)
        return rows.reshape(*inputs.shape[:-1], self.features)


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """MAE/DiT 1-D sin-cos embedding: (M,) positions -> (M, embed_dim) as [sin | cos]."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, (grid_h * grid_w, embed_dim), row-major tokens.

    As in the official code (MAE's `get_2d_sincos_pos_embed`), the first half of the channels
    encodes the column index and the second half the row index; for square grids this is
    bit-for-bit the official table, and it extends to any H x W grid.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs hidden_size % 4 == 0, got {embed_dim}")
    rows, cols = np.meshgrid(
        np.arange(grid_h, dtype=np.float32), np.arange(grid_w, dtype=np.float32), indexing="ij"
    )
    emb_cols = sincos_1d(embed_dim // 2, cols)
    emb_rows = sincos_1d(embed_dim // 2, rows)
    return np.concatenate([emb_cols, emb_rows], axis=1).astype(np.float32)


def sincos_spacetime(embed_dim: int, frames: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Video tokens (frames * grid_h * grid_w, embed_dim), frame-major: the image table of each frame's
    grid plus a 1-D table of the frame index (spatial and temporal positions added, as factorised
    video DiTs do), so every frame's spatial code is the image model's."""
    spatial = sincos_2d(embed_dim, grid_h, grid_w)
    temporal = sincos_1d(embed_dim, np.arange(frames, dtype=np.float32)).astype(np.float32)
    return (temporal[:, None, :] + spatial[None, :, :]).reshape(frames * grid_h * grid_w, embed_dim)


def timestep_frequencies(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """GLIDE/DiT sinusoidal timestep features [cos | sin], (N,) -> (N, dim), in float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation x * (1 + scale) + shift, with per-sample (N, D) shift and scale."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class TimestepEmbedder(nn.Module):
    """Scalar times -> hidden vectors: 256-d sinusoid -> Linear -> SiLU -> Linear."""

    hidden_size: int
    frequency_embedding_size: int = 256
    dtype: Dtype = jnp.float32
    parametrization: str = "sp"
    layout: str = "accelerator"

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        init = fan_in_normal if self.parametrization == "mup" else nn.initializers.normal(0.02)
        h = timestep_frequencies(t, self.frequency_embedding_size)
        h = Dense(self.hidden_size, kernel_init=init, dtype=self.dtype, layout=self.layout, name="mlp_0")(h)
        h = nn.silu(h)
        return Dense(self.hidden_size, kernel_init=init, dtype=self.dtype, layout=self.layout, name="mlp_2")(h)


class LabelEmbedder(nn.Module):
    """Class labels -> hidden vectors, with one extra "null" row for classifier-free guidance.

    Label `num_classes` is the null class. In training, each label is replaced by the null class
    with probability `dropout_prob` (RNG stream 'dropout'), as the official `token_drop`.
    """

    num_classes: int
    hidden_size: int
    dropout_prob: float
    dtype: Dtype = jnp.float32
    parametrization: str = "sp"

    @nn.compact
    def __call__(self, labels: jax.Array, train: bool, draws: jax.Array | None = None) -> jax.Array:
        """`draws` (N,): one uniform [0, 1) number per example, dropped where below `dropout_prob` (the
        objective draws them per example, so that microbatches reproduce a whole batch); None: drawn
        here from the 'dropout' stream."""
        use_cfg_embedding = int(self.dropout_prob > 0)
        table = nn.Embed(
            self.num_classes + use_cfg_embedding,
            self.hidden_size,
            # muP: an input layer, torch's default N(0, 1) as the muP-DiT code keeps it
            embedding_init=nn.initializers.normal(1.0 if self.parametrization == "mup" else 0.02),
            dtype=self.dtype,
            name="embedding_table",
        )
        if train and self.dropout_prob > 0:
            drop = (jax.random.bernoulli(self.make_rng("dropout"), self.dropout_prob, labels.shape) if draws is None
                    else draws < self.dropout_prob)
            labels = jnp.where(drop, self.num_classes, labels)
        return table(labels)


class TagEmbedder(nn.Module):
    """Multi-label tags (a multi-hot (N, num_tags) vector) -> the sum of their embeddings, as the audio
    experiment conditions on genre and instrument tags. In training all tags of an example are
    dropped with probability `dropout_prob` (RNG stream 'dropout'): the all-zero vector is the
    unconditional input classifier-free guidance uses."""

    num_tags: int
    hidden_size: int
    dropout_prob: float
    dtype: Dtype = jnp.float32
    layout: str = "accelerator"

    @nn.compact
    def __call__(self, tags: jax.Array, train: bool, draws: jax.Array | None = None) -> jax.Array:
        """`draws`: as `LabelEmbedder`'s."""
        tags = tags.astype(jnp.float32)
        if train and self.dropout_prob > 0:
            keep = (~jax.random.bernoulli(self.make_rng("dropout"), self.dropout_prob, tags.shape[:1])
                    if draws is None else draws >= self.dropout_prob)
            tags = tags * keep[:, None]
        return Dense(self.hidden_size, use_bias=False, kernel_init=nn.initializers.normal(0.02), dtype=self.dtype,
                     layout=self.layout, name="embedding")(tags)


ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")


def resolve_attention_impl(impl: str, backend: str, dtype: Any, head_dim: int) -> str:
    """'auto' -> 'cudnn' (fused flash attention) where cuDNN supports the call, else 'xla'.

    jax.nn.dot_product_attention's own default (None) always takes the XLA path, so 'auto' picks
    cuDNN itself: on GPUs, for bfloat16/float16 inputs with head_dim a multiple of 8 up to 128
    (SiT's heads are 64 or 72 wide). `backend` is the platform of the devices the model runs on:
    the builders call this with the mesh's (`lsync_jax.builders.build_model`); a model left at
    'auto' by the Python API takes the XLA path.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; expected one of {ATTENTION_IMPLS}")
    if impl == "splash" and backend not in ("tpu", "cpu"):
        raise ValueError(f"attention_impl='splash' is the Pallas kernel for TPUs (on the CPU: its interpreter, for "
                         f"tests); the devices here are {backend!r}: use 'auto', 'xla' or 'cudnn'")
    if impl != "auto":
        return impl
    fused_ok = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if backend == "gpu" and fused_ok and head_dim % 8 == 0 and head_dim <= 128 else "xla"


def heads_first_attention(qkv: jax.Array, num_heads: int) -> jax.Array:
    """Softmax attention of a fused (N, T, 3 * D) qkv, as jax.nn.dot_product_attention's XLA path
    computes it (logits in float32, scaled by 1/sqrt(head_dim)), with q, k and v split off and put
    heads-first before the two batched products.

    Why: XLA:CPU. Slicing a (three, heads, dim) view makes each slice's gradient a full-size pad,
    and the (T, heads) layout of the products makes their operands transposed copies; split
    heads-first, the backward pass concatenates once. One SiT block's attention (batch 64, 49
    tokens, 3 heads of 64) took 20 ms forward and backward this way, 25 ms the other. In bfloat16 and
    float16 the logits' gradient stays float32 here, where jax's precision preset rounds it to the
    input dtype, so gradients differ in the last bits (they are the more precise).
    """
    n, t, _ = qkv.shape
    q, k, v = (z.reshape(n, t, num_heads, -1).transpose(0, 2, 1, 3) for z in jnp.split(qkv, 3, axis=-1))
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=logits_dtype)
    logits = logits * jnp.asarray(q.shape[-1] ** -0.5, logits_dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(k.dtype)
    out = jnp.einsum("bnts,bnsh->bnth", probs, v)
    return out.transpose(0, 2, 1, 3).reshape(n, t, -1)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, interpret: bool = False) -> jax.Array:
    """Softmax attention of (N, T, heads, head_dim) q, k, v by the Pallas splash-attention kernel for TPU
    (jax.experimental.pallas.ops.tpu.splash_attention): blockwise, so the (heads, T, T) logits are never
    stored, which is what lets 512 px SiTs (1,024 tokens) fit a chip's HBM. Inside a `jax.set_mesh`
    context (the train step sets it for a model with attention_impl='splash') the kernel runs per device
    on its share of the batch (shard_map over every mesh axis, the batch's sharding); outside one, on the
    whole batch. `interpret`: Pallas's interpreter, for checking the numbers on a CPU."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # noqa: PLC0415 - TPU kernels, on use

    n, t, heads, head_dim = q.shape
    if t % 128:
        raise ValueError(f"attention_impl='splash' works on blocks of 128 tokens; this input has {t} tokens (set "
                         "model.attention_impl='xla', or an input whose token count is a multiple of 128)")
    block = 512 if t % 512 == 0 else 256 if t % 256 == 0 else 128
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mha(splash.MultiHeadMask([splash.FullMask((t, t))] * heads), head_shards=1,
                                    q_seq_shards=1, block_sizes=sizes, interpret=interpret)

    def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        scale = jnp.asarray(head_dim**-0.5, q.dtype)  # the kernel takes q pre-scaled
        heads_first = [z.transpose(0, 2, 1, 3) for z in (q * scale, k, v)]
        return jax.vmap(kernel)(*heads_first).transpose(0, 2, 1, 3)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return attend(q, k, v)
    batch = jax.sharding.PartitionSpec(mesh.axis_names)
    return jax.shard_map(attend, in_specs=(batch, batch, batch), out_specs=batch, check_vma=False)(q, k, v)


class Attention(nn.Module):
    """timm-style multi-head self-attention (fused qkv with bias) on jax.nn.dot_product_attention.

    `implementation`: 'xla', 'cudnn' or 'splash' (the TPU kernel, `splash_attention`; Pallas's
    interpreter in the 'cpu' layout); 'auto' is resolved by the builders from the mesh's platform
    (`resolve_attention_impl`) and means 'xla' here. `layout` 'cpu' splits a fused qkv heads-first
    (`heads_first_attention`) where the XLA path takes no padding lengths.
    """

    hidden_size: int
    num_heads: int
    dtype: Dtype = jnp.float32
    implementation: str = "auto"
    parametrization: str = "sp"
    layout: str = "accelerator"

    @nn.compact
    def __call__(self, x: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """`lengths` (N,): tokens at or after an example's length are padding, never attended to (the
        fused kernels take lengths, not arbitrary masks: padding is always at the end)."""
        # Logits stay scaled by 1/sqrt(head_dim) under muP too, as the muP-DiT code: width grows by heads.
        kernel_init = fan_in_normal if self.parametrization == "mup" else xavier_uniform
        qkv = Dense(3 * self.hidden_size, kernel_init=kernel_init, dtype=self.dtype, layout=self.layout, name="qkv")(x)
        if self.implementation not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention implementation {self.implementation!r}; expected one of "
                             f"{ATTENTION_IMPLS}")
        impl = "xla" if self.implementation == "auto" else self.implementation
        if lengths is None and impl == "xla" and self.layout == "cpu":
            out = heads_first_attention(qkv, self.num_heads)
        else:
            q, k, v = einops.rearrange(qkv, "b t (three h d) -> three b t h d", three=3, h=self.num_heads)
            if impl == "splash":
                if lengths is not None:
                    raise ValueError("attention_impl='splash' takes no padding lengths (padded sequences): use "
                                     "'xla' or 'cudnn'")
                out = splash_attention(q, k, v, interpret=self.layout == "cpu")
            else:
                seq_lengths = None if lengths is None else lengths.astype(jnp.int32)
                out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=seq_lengths, implementation=impl)
            out = einops.rearrange(out, "b t h d -> b t (h d)")
        return Dense(self.hidden_size, kernel_init=kernel_init, dtype=self.dtype, layout=self.layout, name="proj")(out)


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear, as timm's Mlp with DiT's approximate GELU."""

    hidden_size: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    parametrization: str = "sp"
    layout: str = "accelerator"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_init = fan_in_normal if self.parametrization == "mup" else xavier_uniform
        dense = dict(kernel_init=kernel_init, dtype=self.dtype, layout=self.layout)
        h = Dense(int(self.hidden_size * self.mlp_ratio), name="fc1", **dense)(x)
        h = nn.gelu(h, approximate=True)
        return Dense(self.hidden_size, name="fc2", **dense)(h)


def layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
    """LayerNorm without affine parameters, eps 1e-6 (statistics in float32)."""
    return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, name=name)


def adaln_modulation(features: int, dtype: Dtype, name: str = "adaLN_modulation",
                     parametrization: str = "sp", layout: str = "accelerator") -> Dense:
    """The Linear behind SiLU that produces shift/scale/gate: zero-initialised (adaLN-Zero), except
    under muP, where it is a hidden layer initialised N(0, 1/fan_in) as the muP-DiT code does."""
    kernel_init = fan_in_normal if parametrization == "mup" else nn.initializers.zeros
    return Dense(
        features, kernel_init=kernel_init, bias_init=nn.initializers.zeros, dtype=dtype, layout=layout, name=name
    )


def dummy_inputs(batch_size: int, input_size: int, in_channels: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Zero (x, t, y) of an image model's input shape, for `init` and `jax.eval_shape`."""
    x = jnp.zeros((batch_size, input_size, input_size, in_channels), jnp.float32)
    return x, jnp.zeros((batch_size,), jnp.float32), jnp.zeros((batch_size,), jnp.int32)


def check_image_inputs(kind: str, x: jax.Array, t: jax.Array, y: jax.Array, in_channels: int,
                       patch_size: int) -> None:
    """Raise a ValueError naming the problem for (x, t, y) a patch-based `kind` model cannot take."""
    if x.ndim != 4:
        raise ValueError(f"{kind} expects NHWC inputs of rank 4, got shape {x.shape}")
    n, h, w, c = x.shape
    if c != in_channels:
        raise ValueError(f"{kind} has in_channels={in_channels} but the input has shape {x.shape} (NHWC)")
    if h % patch_size or w % patch_size:
        raise ValueError(f"input spatial size {h}x{w} is not divisible by patch_size={patch_size}")
    if t.shape != (n,):
        raise ValueError(f"t must have shape ({n},) for a batch of {n}, got {t.shape}")
    if y.shape != (n,):
        raise ValueError(f"y must have shape ({n},) for a batch of {n}, got {y.shape}")


class AdaLNBlock(nn.Module):
    """DiT/SiT adaLN-Zero transformer block: x + gate * f(modulate(LN(x))) for attention and MLP."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    parametrization: str = "sp"
    layout: str = "accelerator"

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        mod = adaln_modulation(6 * self.hidden_size, self.dtype, parametrization=self.parametrization,
                               layout=self.layout)(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        h = modulate(layer_norm("norm1", self.dtype)(x), shift_msa, scale_msa)
        h = Attention(self.hidden_size, self.num_heads, self.dtype, self.attention_impl, self.parametrization,
                      self.layout, name="attn")(h, lengths)
        x = x + gate_msa[:, None, :] * h
        h = modulate(layer_norm("norm2", self.dtype)(x), shift_mlp, scale_mlp)
        h = Mlp(self.hidden_size, self.mlp_ratio, self.dtype, self.parametrization, self.layout, name="mlp")(h)
        return x + gate_mlp[:, None, :] * h


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a zero-initialised Linear to patch * patch * out_channels.

    Under muP the Linear is a readout (microsoft/mup's MuReadout): its input is multiplied by
    output_multiplier / width_multiplier, so its output stays O(1) as the width grows."""

    hidden_size: int
    patch_size: int
    out_channels: int
    dtype: Dtype = jnp.float32
    parametrization: str = "sp"
    output_multiplier: float = 1.0
    width_multiplier: float = 1.0
    patch_elements: int = 0  # input elements per patch (0: patch_size ** 2, an image patch)
    layout: str = "accelerator"

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        mod = adaln_modulation(2 * self.hidden_size, self.dtype, parametrization=self.parametrization,
                               layout=self.layout)(nn.silu(c))
        shift, scale = jnp.split(mod, 2, axis=-1)
        x = modulate(layer_norm("norm_final", self.dtype)(x), shift, scale)
        if self.parametrization == "mup":
            x = x * (self.output_multiplier / self.width_multiplier)
        return Dense(
            (self.patch_elements or self.patch_size * self.patch_size) * self.out_channels,
            kernel_init=nn.initializers.zeros,
            dtype=self.dtype,
            layout=self.layout,
            name="linear",
        )(x)
