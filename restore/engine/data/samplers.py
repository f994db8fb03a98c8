"""Batch-composition samplers (Dassl's names); prompt configs use Random (train) and Sequential (test)."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import RandomSampler, Sampler, SequentialSampler

__all__ = ["build_sampler", "RandomDomainSampler", "SeqDomainSampler", "RandomClassSampler"]


def _group(data_source: Sequence[Any], key: str) -> dict[Any, list[int]]:
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, item in enumerate(data_source):
        groups[getattr(item, key)].append(i)
    return groups


class RandomDomainSampler(Sampler):
    """Each batch: ``n_domain`` random domains x ``batch_size / n_domain`` random images each."""

    def __init__(self, data_source: Sequence[Any], batch_size: int, n_domain: int) -> None:
        self.domain_dict = _group(data_source, "domain")
        domains = list(self.domain_dict)
        n_domain = len(domains) if n_domain is None or n_domain <= 0 else n_domain
        if batch_size % n_domain:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by n_domain ({n_domain})")
        self.domains, self.n_domain, self.n_per_domain = domains, n_domain, batch_size // n_domain
        self.length = len(list(self._indices()))

    def _indices(self) -> Iterator[int]:
        pools = {d: list(idxs) for d, idxs in self.domain_dict.items()}
        while True:
            chosen = random.sample(self.domains, self.n_domain)
            if any(len(pools[d]) < self.n_per_domain for d in chosen):
                return
            for d in chosen:
                picks = random.sample(pools[d], self.n_per_domain)
                for idx in picks:
                    pools[d].remove(idx)
                yield from picks

    def __iter__(self) -> Iterator[int]:
        return self._indices()

    def __len__(self) -> int:
        return self.length


class SeqDomainSampler(Sampler):
    """Each batch holds ``batch_size / n_domains`` shuffled images from every domain, in domain order."""

    def __init__(self, data_source: Sequence[Any], batch_size: int) -> None:
        self.domain_dict = _group(data_source, "domain")
        self.domains = sorted(self.domain_dict)
        if batch_size % len(self.domains):
            raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of domains ({len(self.domains)})")
        self.n_per_domain = batch_size // len(self.domains)
        n_batches = min(len(v) for v in self.domain_dict.values()) // self.n_per_domain
        self.length = n_batches * batch_size

    def __iter__(self) -> Iterator[int]:
        pools = {d: random.sample(v, len(v)) for d, v in self.domain_dict.items()}
        for b in range(self.length // (self.n_per_domain * len(self.domains))):
            for d in self.domains:
                yield from pools[d][b * self.n_per_domain:(b + 1) * self.n_per_domain]

    def __len__(self) -> int:
        return self.length


class RandomClassSampler(Sampler):
    """Each batch: ``batch_size / n_ins`` random classes x ``n_ins`` images each (resampled if short)."""

    def __init__(self, data_source: Sequence[Any], batch_size: int, n_ins: int) -> None:
        if batch_size < n_ins or batch_size % n_ins:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of n_ins ({n_ins})")
        self.index_dic = _group(data_source, "label")
        self.labels = list(self.index_dic)
        self.n_ins, self.ncls_per_batch = n_ins, batch_size // n_ins
        self.length = sum(max(len(v), n_ins) // n_ins * n_ins for v in self.index_dic.values())

    def __iter__(self) -> Iterator[int]:
        chunks: dict[Any, list[list[int]]] = {}
        for label, idxs in self.index_dic.items():
            idxs = random.choices(idxs, k=self.n_ins) if len(idxs) < self.n_ins else random.sample(idxs, len(idxs))
            chunks[label] = [idxs[i:i + self.n_ins] for i in range(0, len(idxs) - self.n_ins + 1, self.n_ins)]
        avail = [lab for lab in self.labels if chunks[lab]]
        while len(avail) >= self.ncls_per_batch:
            for label in random.sample(avail, self.ncls_per_batch):
                yield from chunks[label].pop(0)
                if not chunks[label]:
                    avail.remove(label)

    def __len__(self) -> int:
        return self.length


def build_sampler(sampler_type: str, cfg: Any = None, data_source: Sequence[Any] | None = None,
                  batch_size: int = 32, n_domain: int = 0, n_ins: int = 16,
                  generator: torch.Generator | None = None) -> Sampler:
    """The sampler named ``sampler_type``; ``generator`` seeds RandomSampler (reproducible order)."""
    if sampler_type == "RandomSampler":
        return RandomSampler(data_source, generator=generator)
    if sampler_type == "SequentialSampler":
        return SequentialSampler(data_source)
    if sampler_type == "RandomDomainSampler":
        return RandomDomainSampler(data_source, batch_size, n_domain)
    if sampler_type == "SeqDomainSampler":
        return SeqDomainSampler(data_source, batch_size)
    if sampler_type == "RandomClassSampler":
        return RandomClassSampler(data_source, batch_size, n_ins)
    raise ValueError(f"Unknown sampler type: {sampler_type}")
