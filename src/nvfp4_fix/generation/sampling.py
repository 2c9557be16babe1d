"""Token selection on the device, without torch.multinomial or a host sync (so a CUDA graph can hold it).

Temperature, top-k and top-p follow transformers' warpers (``TemperatureLogitsWarper``,
``TopKLogitsWarper``, ``TopPLogitsWarper``, in that order); each may be one value for every row or one
value per row. A sample is ``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d. (the exponential race: an exact
draw from ``p``), drawn from ``generator`` (default: the device's default generator). Greedy is the
first maximum, as ``torch.argmax`` and transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["RowParam", "SamplingParams", "argmax_first", "make_sampler", "sampling_params", "warp_logits"]

#: one value for the whole batch, or one per row (a sequence or a 1-D tensor)
RowParam = float | int | Sequence[float] | Sequence[int] | torch.Tensor | None


@dataclass(frozen=True)
class SamplingParams:
    """Validated per-row sampling settings: ``temperature`` [B] (0 = greedy row), ``top_k`` [B] (0 = off),
    ``top_p`` [B] (1 = off), as Python tuples (hashable: part of a cached runner's key)."""

    temperature: tuple[float, ...]
    top_k: tuple[int, ...]
    top_p: tuple[float, ...]

    @property
    def greedy(self) -> bool:
        return all(t == 0 for t in self.temperature)

    def compact(self) -> tuple[RowParam, RowParam, RowParam]:
        """temperature, top_k, top_p: one number where every row has the same (the scalar sampler),
        else the per-row tuple."""
        return tuple(v[0] if len(set(v)) == 1 else v for v in (self.temperature, self.top_k, self.top_p))  # type: ignore[return-value]

    def key(self) -> tuple[object, ...]:
        if self.greedy:
            return ("greedy",)
        return (self.temperature, self.top_k, self.top_p)


def _rows(name: str, value: RowParam, batch: int, default: float) -> tuple[float, ...]:
    if isinstance(value, torch.Tensor):
        value = value.tolist() if value.dim() else value.item()
    if value is None:
        return (default,) * batch
    if isinstance(value, (int, float)):
        return (float(value),) * batch
    values = tuple(float(v) if v is not None else default for v in value)
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} values for a batch of {batch} rows; give one or {batch}")
    return values


def sampling_params(temperature: RowParam, top_k: RowParam, top_p: RowParam, batch: int) -> SamplingParams:
    """Check and expand the sampling arguments to one value per row."""
    temps = _rows("temperature", temperature, batch, 0.0)
    ks = _rows("top_k", top_k, batch, 0.0)
    ps = _rows("top_p", top_p, batch, 1.0)
    for t in temps:
        if not t >= 0 or t == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t}")
    for k in ks:
        if k < 0 or k != int(k):
            raise ValueError(f"top_k must be a whole number >= 0 (0 or None = off), got {k}")
    for p in ps:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {p}")
    # greedy rows ignore top-k / top-p (as transformers with do_sample=False)
    ks = tuple(int(k) if t > 0 else 0 for k, t in zip(ks, temps, strict=True))
    ps = tuple(p if t > 0 else 1.0 for p, t in zip(ps, temps, strict=True))
    return SamplingParams(temps, ks, ps)


def warp_logits(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    top_k: int | torch.Tensor | None = None,
    top_p: float | torch.Tensor | None = None,
    *,
    k_max: int | None = None,
) -> torch.Tensor:
    """float32 scores [B, V] after temperature, top-k and top-p, as transformers' warpers (in that
    order): removed tokens are -inf. Each setting is a number or a [B] tensor on the logits' device
    (per row; top_k 0 and top_p 1 turn a row's filter off; ``k_max`` bounds a per-row top_k, default
    the vocabulary). Static shapes, no host sync."""
    scores = logits.float()
    if isinstance(temperature, torch.Tensor):
        scores = scores / temperature.view(-1, 1)
    else:
        scores = scores / temperature
    if isinstance(top_k, torch.Tensor):
        top = torch.topk(scores, min(k_max or scores.shape[-1], scores.shape[-1]), dim=-1).values
        k = top_k.long().clamp(max=top.shape[-1]).view(-1, 1)
        kth = top.gather(-1, (k - 1).clamp(min=0))
        kth = torch.where(k > 0, kth, torch.full_like(kth, float("-inf")))
        scores = scores.masked_fill(scores < kth, float("-inf"))
    elif top_k:
        kth = torch.topk(scores, min(int(top_k), scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if isinstance(top_p, torch.Tensor) or (top_p is not None and top_p < 1.0):
        sorted_scores, sorted_idx = torch.sort(scores, dim=-1, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        if isinstance(top_p, torch.Tensor):
            remove = (cum <= (1.0 - top_p.view(-1, 1))) & (top_p < 1.0).view(-1, 1)
        else:
            remove = cum <= (1.0 - top_p)
        remove[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return scores


def argmax_first(logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``torch.argmax(logits, -1)`` for [B, V] (the first maximum on ties), in two stages (the maximum
    of each ``chunk`` values, then of those) so that a compiled step reduces a 128k vocabulary in
    parallel rather than in one program."""
    b, v = logits.shape
    if v <= 4 * chunk:
        return torch.argmax(logits, dim=-1)
    x = torch.nn.functional.pad(logits.float(), (0, -v % chunk), value=float("-inf"))
    best, idx = x.view(b, -1, chunk).max(dim=-1)
    which = torch.argmax(best, dim=-1, keepdim=True)
    return (which * chunk + idx.gather(-1, which)).squeeze(-1)


def make_sampler(
    temperature: RowParam = 0.0,
    top_k: RowParam = None,
    top_p: RowParam = None,
    *,
    generator: torch.Generator | None = None,
    batch: int | None = None,
    device: torch.device | str | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """logits [B, V] -> token ids [B] (int64). Scalar settings apply to every row; sequences (then
    ``batch`` is their length unless given) set each row's own. Temperature 0 is greedy for that row
    (the first maximum). Sampled rows: :func:`warp_logits`, then the exponential race with
    ``generator``. The returned function has ``.greedy`` True when every row is greedy."""

    def rows(v: RowParam) -> bool:
        return isinstance(v, Sequence) or (isinstance(v, torch.Tensor) and v.dim() > 0)

    if batch is None:
        seqs = [len(v) for v in (temperature, top_k, top_p) if rows(v)]  # type: ignore[arg-type]
        batch = seqs[0] if seqs else 1
    params = sampling_params(temperature, top_k, top_p, batch)
    per_row = any(rows(v) for v in (temperature, top_k, top_p))
    if params.greedy:

        def greedy(logits: torch.Tensor) -> torch.Tensor:
            return torch.argmax(logits, dim=-1)

        greedy.greedy = True  # type: ignore[attr-defined]
        return greedy

    if per_row:
        dev = torch.device(device) if device is not None else None
        temps = torch.tensor(params.temperature, dtype=torch.float32, device=dev)
        greedy_rows = temps == 0
        warp_t: float | torch.Tensor = torch.where(greedy_rows, torch.ones_like(temps), temps)
        k_max = max(params.top_k)
        warp_k: int | torch.Tensor | None = torch.tensor(params.top_k, device=dev) if k_max else None
        warp_p: float | torch.Tensor | None = (
            torch.tensor(params.top_p, dtype=torch.float32, device=dev) if min(params.top_p) < 1.0 else None
        )
        any_greedy = 0.0 in params.temperature
    else:
        warp_t, k_max = params.temperature[0], params.top_k[0]
        warp_k = k_max or None
        warp_p = params.top_p[0] if params.top_p[0] < 1.0 else None
        greedy_rows, any_greedy = None, False

    def sample(logits: torch.Tensor) -> torch.Tensor:
        scores = warp_logits(logits, warp_t, warp_k, warp_p, k_max=k_max or None)
        probs = torch.softmax(scores, dim=-1)
        race = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_min_(1e-30)
        token = torch.argmax(probs / race, dim=-1)
        if any_greedy:
            token = torch.where(greedy_rows, torch.argmax(logits, dim=-1), token)
        return token

    sample.greedy = False  # type: ignore[attr-defined]
    return sample
