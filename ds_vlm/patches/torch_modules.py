"""Changes to single torch modules of a loaded model: Qwen's patch embedding, the token embeddings' output."""

from __future__ import annotations

import torch

from ds_vlm.patches import patch

PATCH_PROJECTION = patch(
    "qwen_patch_embedding_as_linear", library="torch", versions="torch 2.14.1 (cuDNN 9), transformers 5.24.0",
    target="the class of Qwen-VL's vision patch embedding (a Conv3d with stride == kernel, unpadded) swapped to "
           "PatchProjection, a Conv3d subclass whose forward is one linear layer over the flattened patch",
    reason="the same numbers, without the cuDNN convolution kernels some versions pick badly for it "
           "(pytorch#174051: a 10-20x slower vision forward; transformers#45750: up to ~50,000x on Blackwell "
           "bf16). The module keeps its class hierarchy, parameters and names: checkpoints, exports and loaded "
           "weights are unchanged",
    scope="Adapter.prepare of the Qwen-VL families (model loading); for the model's life")

EMBEDDINGS_REQUIRE_GRAD = patch(
    "token_embeddings_output_requires_grad", library="torch", versions="torch 2.14.1, transformers 5.24.0",
    target="a forward hook on the token embeddings that marks their output as requiring grad",
    reason="with --gradient_checkpointing and frozen embeddings, the checkpointed layers' inputs would not "
           "require grad and the graph would be cut. transformers' enable_input_require_grads() does the same "
           "but also hooks the vision tower's patch embedding (Qwen2-VL, Qwen2.5-VL, CLIP), which makes a frozen "
           "vision tower build a graph and keep all its activations for a backward that never reaches a parameter",
    scope="enable_checkpointing (model loading); for the model's life")


class PatchProjection(torch.nn.Conv3d):
    """Qwen's patch embedding, `Conv3d(kernel_size=stride=patch)` over inputs exactly one patch in size, run as
    what it is: one linear layer over the flattened patch, with the same weight (reshaped) and bias
    (PATCH_PROJECTION)."""

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        flat = patches.reshape(patches.shape[0], -1)
        out = torch.nn.functional.linear(flat, self.weight.reshape(self.out_channels, -1), self.bias)
        return out.view(patches.shape[0], self.out_channels, 1, 1, 1)


def use_patch_projection(conv: torch.nn.Module) -> bool:
    """Turn a stride == kernel, unpadded Conv3d into a PatchProjection in place; False if it is not one."""
    if type(conv) is not torch.nn.Conv3d or tuple(conv.stride) != tuple(conv.kernel_size) or conv.groups != 1 \
            or any(conv.padding) or any(d != 1 for d in conv.dilation):
        return False
    conv.__class__ = PatchProjection
    return True


def _output_requires_grad(module, inputs, output):
    output.requires_grad_(True)


def embeddings_output_requires_grad(embeddings: torch.nn.Module):
    """EMBEDDINGS_REQUIRE_GRAD on `embeddings`; returns the hook's handle."""
    return embeddings.register_forward_hook(_output_requires_grad)
