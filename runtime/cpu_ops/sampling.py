"""Token selection on the host: greedy, or temperature / top-k / top-p sampling with a seed; EOS handling."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit
    seed: int | None = None
    min_tokens: int = 0  # EOS is suppressed until this many tokens were generated
    ignore_eos: bool = False
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def is_eos(self, token: int) -> bool:
        return not self.params.ignore_eos and token in self.params.eos_token_ids

    def __call__(self, logits: np.ndarray, num_generated: int) -> int:
        p = self.params
        logits = np.asarray(logits)
        if p.eos_token_ids and (p.ignore_eos or num_generated < p.min_tokens):
            logits = logits.copy()
            logits[list(p.eos_token_ids)] = -np.inf
        if p.temperature <= 0:  # greedy: argmax of the float32 logits, no float64 copy of the vocabulary per token
            return int(np.argmax(logits))
        logits = logits.astype(np.float64) / p.temperature
        if p.top_k and p.top_k < logits.size:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = cumulative - probs[order] < p.top_p  # the smallest prefix whose mass reaches top_p
            trimmed = np.zeros_like(probs)
            trimmed[order[keep]] = probs[order[keep]]
            probs = trimmed / trimmed.sum()
        return int(self.rng.choice(probs.size, p=probs))
