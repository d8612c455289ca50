"""Token batches for the tiny models."""

import torch


def token_batch(seed: int = 0, batch: int = 2, length: int = 12, vocab: int = 128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)
