"""Measured activation memory of one scored forward and backward, from the tensors torch creates.

A dispatch mode sees every tensor an operation returns (on the CPU as on a GPU) and follows its
storage until it is freed: the peak of the live bytes is what a caching allocator would have to hold
at least. Parameters exist before and are not counted; the gradients of parameters that exist at
the peak are taken off, so the number is the activations (and transient buffers) the planner's
formula predicts (dsdpo/planner/activations.py). torch's MemTracker was tried first: under gradient
checkpointing its peak did not change with the number of layers or the vocabulary, so it is not used.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dsdpo.objective.logprobs import HEAD_SLICE_BYTES, MaskedTokenScorer


class LiveTensorBytes(TorchDispatchMode):
    """Live and peak bytes of the storages created by operations run under this mode; storages that
    become parameter gradients (`gradient`) are counted apart, so the peak is that of the rest."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.gradients = 0
        self.peak = 0
        self.storages: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # storage -> bytes

    def ignore(self, tensors) -> None:
        """Storages that existed before (parameters, inputs): their views are not new memory."""
        for tensor in tensors:
            self.storages[tensor.untyped_storage()] = 0

    def gradient(self, tensor) -> None:
        """`tensor` became a parameter's gradient: from now on it counts as a gradient."""
        storage = tensor.untyped_storage()
        size = self.storages.get(storage, 0)
        if size:
            self.storages[storage] = 0
            self.live -= size
            self.gradients += size
            weakref.finalize(storage, self._freed_gradient, size)

    def _freed(self, size: int) -> None:
        self.live -= size

    def _freed_gradient(self, size: int) -> None:
        self.gradients -= size
        self.live += size  # _freed runs for it too

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            if storage in self.storages:
                continue
            size = storage.nbytes()
            self.storages[storage] = size
            weakref.finalize(storage, self._freed, size)
            self.live += size
            self.peak = max(self.peak, self.live)
        return out


def scored_inputs(vocab: int, rows: int, width: int, masked: int, *, mask_token_id: int, seed: int = 0):
    """Inputs of a chunk: `rows` rows of `width` tokens, the last `masked` positions of each masked."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, min(vocab, mask_token_id), (rows, width), generator=generator)
    scored = torch.zeros(rows, width, dtype=torch.bool)
    scored[:, width - masked :] = True
    return {
        "input_ids": targets.masked_fill(scored, mask_token_id),
        "attention_mask": torch.ones(rows, width, dtype=torch.long),
        "scored": scored,
        "targets": targets,
    }


def measured_activation_bytes(
    model, inputs: dict, *, grad: bool = True, slice_bytes: int = HEAD_SLICE_BYTES
) -> int:
    """Peak bytes beyond parameters and their gradients of scoring `inputs` (and its backward), the
    output layer in slices of `slice_bytes` (dsdpo.objective.logprobs)."""
    scorer = MaskedTokenScorer(model, head_slice_bytes=slice_bytes)
    model.zero_grad(set_to_none=True)
    mode = LiveTensorBytes()
    mode.ignore([*model.parameters(), *model.buffers(), *inputs.values()])
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p: mode.gradient(p.grad))
        for p in model.parameters()
        if p.requires_grad
    ]
    with mode, torch.set_grad_enabled(grad):
        sums = scorer(**inputs)
        if grad:
            sums.sum().backward()
    for hook in hooks:
        hook.remove()
    model.zero_grad(set_to_none=True)
    return int(mode.peak)
