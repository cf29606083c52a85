"""Random token sequences for a causal language model, importable by ``class_path`` from a run
config (the bundled ``transformers`` config trains a tiny GPT-2 on them). Imports torch only.

>>> data = RandomTokens(num_samples=4, seq_len=6, vocab_size=10, seed=0)
>>> len(data), sorted(data[0]), tuple(data[0]['input_ids'].shape)
(4, ['input_ids', 'labels'], (6,))
>>> bool((data[0]['labels'] == data[0]['input_ids']).all())
True
"""

from __future__ import annotations

import torch

__all__ = ["RandomTokens"]


class RandomTokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """``num_samples`` sequences of ``seq_len`` token ids below ``vocab_size``, drawn from a
    generator seeded with ``seed``; each item is ``{'input_ids': ids, 'labels': ids}`` (the
    model shifts the labels itself).

    >>> RandomTokens(2, 3, 5, seed=1)[1]['input_ids'].tolist() == RandomTokens(2, 3, 5, 1)[1]['input_ids'].tolist()
    True
    """

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int = 0) -> None:
        for name, value in (("num_samples", num_samples), ("seq_len", seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an integer of at least 2; got {vocab_size!r}")
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab_size, (num_samples, seq_len), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}
