"""Quick start: the official README's RegBN snippet (mogvision/regbn), on CUDA or the CPU.

f is a batch of 50 feature vectors (50x512) and g a batch of 50 feature maps (50x64x7x7).
RegBN removes from f the part that g explains linearly; in training it solves the batch's
ridge problem exactly (lambda chosen so that ||W||_F = 1) and keeps a running projection W,
which eval mode uses.

    python examples/quickstart.py
"""

from __future__ import annotations

import torch

import regbn


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    batch_size = 50

    # The official README's settings. 'gpu' is not needed: the layer follows .to(device).
    layer = regbn.RegBN(
        f_num_channels=512,
        g_num_channels=64,
        f_layer_dim=[],
        g_layer_dim=[7, 7],
        normalize_input=True,
        normalize_output=True,
        affine=True,
        sigma_THR=0.0,
        sigma_MIN=0.0,
    ).to(device)
    print(layer)
    print(f"device: {device}")

    # During training: every batch solves for lambda and updates the running projection W.
    # (Code written for the official module, layer(f, g, is_training=True, n_epoch=...,
    # steps_per_epoch=...), runs unchanged.)
    layer.train()
    for step in range(1, 4):
        g = torch.rand(batch_size, 64, 7, 7, device=device)
        # f depends partly on g (the dependence RegBN removes), partly not.
        f = g.flatten(1)[:, :512] + torch.rand(batch_size, 512, device=device)
        f_norm, g_norm = layer(f, g)
        print(
            f"train step {step}: f_norm {tuple(f_norm.shape)}, g_norm {tuple(g_norm.shape)}, "
            f"last_lambda = {float(layer.last_lambda):.4g}, "
            f"||W_run||_F = {float(layer.W.norm()):.4g}"
        )

    # During inference/eval: f minus g times the running W; nothing is updated, and any batch
    # size works (even 1).
    layer.eval()
    with torch.no_grad():
        f_norm, g_norm = layer(f[:1], g[:1])
    print(f"eval: f_norm {tuple(f_norm.shape)}, g_norm {tuple(g_norm.shape)}")
    print(f"W is {tuple(layer.W.shape)} (Dg x Df), ||W||_F = {float(layer.W.norm()):.4g}")


if __name__ == "__main__":
    main()
