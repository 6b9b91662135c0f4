"""A seeded random-token dataset for Trainer runs in the tests (no `datasets` download)."""

import torch


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, vocab: int, n: int = 64, length: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}
