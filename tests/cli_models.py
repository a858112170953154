"""Small model factories for the command-line tests (``regbn inspect tests/cli_models.py:NAME``)."""

from __future__ import annotations

import torch
from torch import nn


class TwoBranch(nn.Module):
    """Gray digit and colored digit, one small conv branch each, fused by cat."""

    def __init__(self) -> None:
        super().__init__()
        self.gray_net = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 8)
        )
        self.colored_net = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 8)
        )
        self.head = nn.Linear(16, 10)

    def forward(self, gray: torch.Tensor, colored: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.gray_net(gray), self.colored_net(colored)], dim=1))


def two_branch() -> nn.Module:
    return TwoBranch()


class Tokens(nn.Module):
    """Text tokens (int64 ids) attend to image patches: the fusion is a matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.patches = nn.Linear(12, 16)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        q = self.embed(ids)
        k = self.patches(image)
        return torch.softmax(q @ k.transpose(1, 2), dim=-1)


def tokens() -> nn.Module:
    return Tokens()


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.fc(x)
        return x


def untraceable() -> nn.Module:
    return Untraceable()


class Mismatch(nn.Module):
    """Traces fine; its second Linear expects 17 features where 16 arrive."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(17, 4))
        self.b = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) * self.b(y)


def mismatch() -> nn.Module:
    return Mismatch()


def broken() -> nn.Module:
    raise RuntimeError("the factory itself fails")


def not_a_model() -> int:
    return 42


NOT_CALLABLE = 3


class DictBatch(nn.Module):
    """One argument holding a dict of modalities."""

    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Linear(20, 8)
        self.video = nn.Linear(30, 8)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.audio(batch["audio"]) + self.video(batch["video"])


class TextEncoder(nn.Module):
    """Token ids and an attention mask in, mean-pooled features out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask[:, :, None].to(torch.float32)
        return (self.embed(input_ids) * m).sum(1) / m.sum(1)


class TextImage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.text = TextEncoder()
        self.image = nn.Linear(12, 8)
        self.head = nn.Linear(16, 2)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixels: torch.Tensor
    ) -> torch.Tensor:
        return self.head(torch.cat([self.text(input_ids, attention_mask), self.image(pixels)], 1))


def text_image() -> nn.Module:
    return TextImage()
