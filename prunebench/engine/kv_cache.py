"""The key/value cache a ``reuse`` stage reads: per strategy and episode, every layer's keys (after
rotary) and values at every original position, from the latest query that computed them.

The engine keeps one only for a strategy that sets ``Strategy.reuses_kv`` (VLA-Cache, Xu et al.,
arXiv 2502.02175). Each query writes what each layer computed, at the tokens' original positions;
a token reused at a layer keeps the value it had, as in VLA-Cache's release, where the cache of a
reused position is not refreshed. A position no query of the episode computed cannot be reused.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self) -> None:
        # layer -> (keys (1, H_kv, L, hd), values (1, H_kv, L, hd), computed (L,) bool on the host)
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def clear(self) -> None:
        self._layers.clear()

    def store(self, layer: int, positions: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              length: int) -> None:
        """Write ``key``/``value`` (1, H_kv, n, hd) of the tokens at original ``positions`` (n,),
        host) of a sequence of original ``length``."""
        entry = self._layers.get(layer)
        if entry is None or entry[0].shape[1:] != (key.shape[1], length, key.shape[3]):
            shape = (1, key.shape[1], length, key.shape[3])
            entry = (key.new_zeros(shape), value.new_zeros(shape), torch.zeros(length, dtype=torch.bool))
            self._layers[layer] = entry
        keys, values, computed = entry
        index = positions.to(key.device, non_blocking=True)  # no copy, no wait on the CPU
        keys.index_copy_(2, index, key)
        values.index_copy_(2, index, value)
        computed[positions] = True

    def missing(self, layer: int, positions: torch.Tensor, length: int) -> torch.Tensor:
        """The ``positions`` (host) that no query of the episode computed at ``layer`` in a sequence
        of original ``length`` (a cache of another length holds nothing for it)."""
        entry = self._layers.get(layer)
        if entry is None or entry[2].numel() != length:
            return positions
        return positions[~entry[2][positions]]

    def fetch(self, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (1, H_kv, r, hd) at original ``positions`` (r,), all computed before."""
        keys, values, _ = self._layers[layer]
        index = positions.to(keys.device, non_blocking=True)
        return keys.index_select(2, index), values.index_select(2, index)
