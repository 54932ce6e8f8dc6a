"""Activation bytes of one forward, with gradients or without, by formula from the model's shape.

Activations (bytes saved for backward, T = rows × width tokens of one forward, b bytes per element,
d hidden, f MLP width, d_q and d_kv = heads and kv heads × head dim (d_q = d but where config.json's
head_dim says otherwise, as SDAR-4B's), h heads), counted tensor by tensor from
dsdpo/families/layers.py (the other Llama-shaped models save the same tensors):

    RMS norm            (4 + 2b)·T·d     its fp32 input, the normed value, the output the linears save
    rotary              0                q·cos saves only cos (no gradient): the [T, head dim] fp32 cos and
                                         sin tables, 8·T·d/h, are shared by every block
    attention           b·T·(2d_q + 2d_kv) + 4·T·h   q, k, v and the output (whose view the out projection
                                         saves) for SDPA's backward, and its fp32 log-sum-exp
    gated MLP           4b·T·f           gate, up, silu(gate), their product
    mixture of experts  f = k·f_expert + f_shared: a token's k experts and the shared expert (their
                        gated MLPs as above), and for each of the k copies of a token (an expert's
                        input rows, dsdpo/families/llada_moe.py) 3b·T·k·d: the gathered input the
                        expert's linears save, its output the routing weight's product saves, that
                        product index_add_ saves; the router's fp32 softmax 4·T·E and the int64
                        indices of top-k, of the gather and of index_add_, 24·T·k
    q/k norms           (4 + 2b)·T·(d_q + d_kv)  per-head RMS norms of queries and keys (SDAR, LLaDA-MoE)
    layer = 2 norms + attention (+ q/k norms) + MLP (+ the experts' copies and router)

    output layer        12·m·V           m = min(M, s): of the M masked positions (the head runs at
                                         those only) one slice of s positions exists at a time
                                         (dsdpo.objective.logprobs, s·4·V ≤ HEAD_SLICE_BYTES), in backward
                                         too:
                                         the recomputed fp32 log-softmax, its gradient and the
                                         gradient of the logits
    with checkpointing  N·b·T·d + max(norm + output layer, layer + b·T·(2d + 2f))
                        (each block keeps its input; one block is recomputed at a time)
    without             N·layer + norm + output layer

These were checked tensor by tensor with autograd's saved-tensor hooks on dsdpo's LLaDA block, and
against measured peaks (benchmarks/planner_accuracy.py).

Compute and activations follow a mixture of experts' ACTIVE parameters (f above, the FLOPs in
report.py), model states its TOTAL ones (every expert is partitioned, offloaded and trained).

A block-diffusion model (SDAR, LLaDA 2.x) scores one forward of [noised ; clean] (dsdpo.objective.blocks): a
row of S tokens is 2S tokens wide in every forward, in T above, in the attention's width and in
--max-tokens-per-forward's budget (dsdpo.objective.chunks.row_widths); its masked positions are the noised
half's, as many as a plain row's.

A forward without gradients keeps one block's transients, b·T·(3d + 3f) + 4·T·d, or one slice of
the output layer's logits, their fp32 copy in bf16 and the log-softmax, (b + 4 + 4·[b = 2])·m·V,
whichever is larger.
"""

from __future__ import annotations

from dsdpo.objective.logprobs import HEAD_SLICE_BYTES, positions_per_slice
from dsdpo.planner.shapes import ModelShape


def chunk_rows(tokens: int, width: int) -> int:
    return max(1, tokens // width)


def row_width(shape: ModelShape, max_length: int) -> int:
    """Tokens of one row in a forward: max_length, twice over for a block model (module docstring)."""
    return max_length * (2 if shape.block_size else 1)


def _norm(shape: ModelShape, tokens: int, b: int) -> float:
    return (4 + 2 * b) * tokens * shape.hidden


def layer_bytes(shape: ModelShape, tokens: int, b: int) -> float:
    """Bytes one block saves for backward on a forward of `tokens` tokens (module docstring)."""
    dq, dkv, f = shape.q_width, shape.kv_width, shape.intermediate
    attention = b * tokens * (2 * dq + 2 * dkv) + 4 * tokens * shape.heads
    if shape.qk_norms:  # an RMS norm over each head's queries and keys, as the layer's own norms
        attention += (4 + 2 * b) * tokens * (dq + dkv)
    mlp = 4 * b * tokens * f
    k = shape.experts_per_token
    experts = tokens * (3 * b * k * shape.hidden + 4 * shape.experts + 24 * k)
    return 2 * _norm(shape, tokens, b) + attention + mlp + experts


def head_positions(shape: ModelShape, masked: float, slice_bytes: int = HEAD_SLICE_BYTES) -> float:
    """m: the masked positions whose logits exist at once, one slice of the output layer at most."""
    return min(masked, positions_per_slice(shape.vocab, slice_bytes))


def head_bytes(shape: ModelShape, masked: float, slice_bytes: int = HEAD_SLICE_BYTES) -> float:
    return 12 * head_positions(shape, masked, slice_bytes) * shape.vocab


def activation_bytes(
    shape: ModelShape,
    tokens: int,
    masked: float,
    b: int,
    *,
    checkpointing: bool,
    slice_bytes: int = HEAD_SLICE_BYTES,
) -> float:
    """Peak bytes of one forward and backward with gradients (module docstring)."""
    head = _norm(shape, tokens, b) + head_bytes(shape, masked, slice_bytes) + 8 * tokens * shape.head_dim
    if not checkpointing:
        return shape.layers * layer_bytes(shape, tokens, b) + head
    recompute = layer_bytes(shape, tokens, b) + b * tokens * (2 * shape.hidden + 2 * shape.intermediate)
    return shape.layers * b * tokens * shape.hidden + max(head, recompute)


def no_grad_activation_bytes(
    shape: ModelShape, tokens: int, masked: float, b: int, slice_bytes: int = HEAD_SLICE_BYTES
) -> float:
    block = b * tokens * (3 * shape.hidden + 3 * shape.intermediate) + 4 * tokens * shape.hidden
    head = (b + 4 + (4 if b == 2 else 0)) * head_positions(shape, masked, slice_bytes) * shape.vocab
    return max(block, head)
