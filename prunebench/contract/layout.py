"""The token layout of one VLA query: which sequence position holds what.

OpenVLA-OFT's sequence is ``BOS | view 0 patches | view 1 patches | proprio | prompt | 56 action
slots | STOP``. Strategies and the engine address visual tokens by *visual index* (0 .. n_visual-1,
views concatenated in order) and everything else by span names. After every removal the engine
calls :meth:`TokenLayout.keep_slots`, so ``positions`` always maps the current slot (index in the
shortened sequence) to the original position.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

# Row groups a strategy may ask attention for (see TokenLayout.row_slots).
ROW_GROUPS = ("text", "prompt", "language", "prefill", "action", "nonvision", "post_visual", "last", "all")


@dataclass(frozen=True)
class ViewSpan:
    """One camera view's patch tokens: a rows x cols grid in raster order starting at ``start``."""

    name: str
    start: int
    rows: int
    cols: int

    @property
    def size(self) -> int:
        return self.rows * self.cols

    @property
    def stop(self) -> int:
        return self.start + self.size


def _shared(build):
    """Memoise a builder of constant tensors shared by every query; they are built as normal
    tensors even under inference mode, so that code with autograd on may index with them too."""
    @functools.lru_cache(maxsize=1024)
    @functools.wraps(build)
    def cached(*args):
        with torch.inference_mode(False):
            return build(*args)
    return cached


@_shared
def _views_of(views: tuple[ViewSpan, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensors that depend on the views alone, built once per view arrangement (do not modify them):
    the view id of every visual index, and the first visual index of every view, then n_visual."""
    view_of = torch.cat([torch.full((v.size,), i) for i, v in enumerate(views)])
    return view_of, torch.tensor([v.start - views[0].start for v in views] + [views[-1].stop - views[0].start])


@_shared
def arange(start: int, stop: int) -> torch.Tensor:
    """``torch.arange(start, stop)``, built once per range: the slot ranges of a query's spans repeat
    from query to query. Shared: do not modify it."""
    return torch.arange(start, stop)


@_shared
def _landmarks(views: tuple[ViewSpan, ...], prompt: tuple[int, int], actions: tuple[int, int],
               stop: int) -> torch.Tensor:
    """Original positions where the spans start and end: the views' starts and the last view's
    stop, then the prompt's, the action slots' and STOP's [start, stop) (do not modify it)."""
    return torch.tensor([v.start for v in views] + [views[-1].stop, *prompt, *actions, stop, stop + 1])


@_shared
def _text_slots(prompt: tuple[int, int], template: tuple[int, ...], first: int) -> torch.Tensor:
    """Slots of the prompt's non-template tokens when the whole prompt is present from slot
    ``first`` on (shared: do not modify it)."""
    return torch.tensor([first + i for i, p in enumerate(range(*prompt)) if p not in template],
                        dtype=torch.long)


@dataclass
class TokenLayout:
    """Spans of one query's sequence plus the current-slot -> original-position map."""

    views: tuple[ViewSpan, ...]
    proprio: tuple[int, int]  # [start, stop) of the proprio token(s)
    prompt: tuple[int, int]  # [start, stop) of the prompt tokens (after BOS)
    template: tuple[int, ...]  # original positions of the prompt's fixed template tokens
    actions: tuple[int, int]  # [start, stop) of the zeroed action slots
    stop: int  # original position of STOP
    positions: torch.Tensor = field(default=None)  # current slot -> original position

    def __post_init__(self) -> None:
        if self.positions is None:
            self.positions = torch.arange(self.length)
        self._reset_caches()
        starts = [v.start for v in self.views]
        if starts[0] != 1 or any(a.stop != b.start for a, b in zip(self.views, self.views[1:])):
            raise ValueError("views must be contiguous and start right after BOS")

    # -- static facts about the original sequence -------------------------------------------
    @property
    def length(self) -> int:
        """Original sequence length."""
        return self.stop + 1

    @property
    def n_visual(self) -> int:
        return sum(v.size for v in self.views)

    @property
    def visual_start(self) -> int:
        return self.views[0].start

    @property
    def n_actions(self) -> int:
        return self.actions[1] - self.actions[0]

    def _reset_caches(self) -> None:
        """Facts about the current sequence, computed when first asked and reset on every removal
        (the engine and strategies ask for the same ones many times per stage)."""
        self._present = self._visual_mask = self._visual_slots = None
        self._span_slots: list[int] | None = None  # current slot of every _landmarks position
        self._rows: dict[str, torch.Tensor] = {}

    def view_of_visual(self) -> torch.Tensor:
        """View id of every visual index (shape n_visual). Do not modify it."""
        return _views_of(self.views)[0]

    def visual_range(self, view: int) -> range:
        """Visual indices of one view."""
        offset = self.views[view].start - self.visual_start
        return range(offset, offset + self.views[view].size)

    def grid_of_visual(self, index: int) -> tuple[int, int, int]:
        """(view, row, col) of a visual index."""
        for i, v in enumerate(self.views):
            local = index - (v.start - self.visual_start)
            if 0 <= local < v.size:
                return i, local // v.cols, local % v.cols
        raise IndexError(f"visual index {index} out of range 0..{self.n_visual - 1}")

    # -- the current (possibly pruned) sequence ---------------------------------------------
    @property
    def current_length(self) -> int:
        return int(self.positions.numel())

    def _slots_of_landmarks(self) -> list[int]:
        """Current slot of every ``_landmarks`` position (where it is or would be): ``positions``
        is sorted, so one ``searchsorted`` locates every span of the current sequence."""
        if self._span_slots is None:
            marks = _landmarks(self.views, self.prompt, self.actions, self.stop)
            self._span_slots = torch.searchsorted(self.positions, marks).tolist()
        return self._span_slots

    def view_slot_bounds(self) -> list[int]:
        """Current slot where each view's present tokens start, then the slot after the last view's.
        The present visual tokens always fill one run of slots, view after view."""
        return self._slots_of_landmarks()[:len(self.views) + 1]

    def view_visual_bounds(self) -> torch.Tensor:
        """First visual index of every view, then n_visual. Do not modify it."""
        return _views_of(self.views)[1]

    def visual_span(self) -> tuple[int, int]:
        """[first, stop) current slots of the present visual tokens (one contiguous run)."""
        bounds = self.view_slot_bounds()
        return bounds[0], bounds[-1]

    def is_visual_slot(self) -> torch.Tensor:
        """Bool mask over current slots: True where the slot holds a visual token. Do not modify it."""
        if self._visual_mask is None:
            first, stop = self.visual_span()
            self._visual_mask = torch.zeros(self.current_length, dtype=torch.bool)
            self._visual_mask[first:stop] = True
        return self._visual_mask

    def visual_slots(self) -> torch.Tensor:
        """Current slots that hold visual tokens, in order."""
        if self._visual_slots is None:
            self._visual_slots = arange(*self.visual_span())
        return self._visual_slots

    def present_visual(self) -> torch.Tensor:
        """Visual indices still in the sequence (sorted). Do not modify it."""
        if self._present is None:
            first, stop = self.visual_span()
            self._present = self.positions[first:stop] - self.visual_start
        return self._present

    def n_present_visual(self, view: int | None = None) -> int:
        bounds = self.view_slot_bounds()
        if view is None:
            return bounds[-1] - bounds[0]
        return bounds[view + 1] - bounds[view]

    def row_slots(self, group: str) -> torch.Tensor:
        """Current slots of a query-row group.

        text: prompt minus its fixed template; prompt: whole prompt; language: BOS + prompt + STOP;
        prefill: everything before the action slots; action: the action slots; nonvision: every
        non-visual token; post_visual: the non-visual tokens after the images (proprio, prompt,
        actions, STOP; SpecPrune-VLA's importance rows); last: STOP; all: every token.
        """
        if group not in self._rows:
            self._rows[group] = self._row_slots(group)
        return self._rows[group]

    def _row_slots(self, group: str) -> torch.Tensor:
        # spans are runs of slots (positions are sorted): their bounds come from one searchsorted
        marks = self._slots_of_landmarks()
        first, stop = marks[0], marks[len(self.views)]  # the visual run; BOS, if present, before it
        prompt, actions, last = marks[-6:-4], marks[-4:-2], marks[-2:]
        if group == "text":
            if prompt[1] - prompt[0] == self.prompt[1] - self.prompt[0]:  # the whole prompt present
                return _text_slots(self.prompt, self.template, prompt[0])
            p = self.positions
            in_prompt = (p >= self.prompt[0]) & (p < self.prompt[1])
            mask = in_prompt & ~torch.isin(p, torch.tensor(self.template, dtype=p.dtype))
            return torch.nonzero(mask, as_tuple=True)[0]
        if group == "prompt":
            return arange(*prompt)
        if group == "language":  # BOS + prompt + STOP
            return torch.cat([arange(0, first), arange(*prompt), arange(*last)])
        if group == "prefill":
            return arange(0, actions[0])
        if group == "action":
            return arange(*actions)
        if group == "nonvision":
            return torch.cat([arange(0, first), arange(stop, self.current_length)])
        if group == "post_visual":  # every slot after the visual run
            return arange(stop, self.current_length)
        if group == "last":
            return arange(*last)
        if group == "all":
            return arange(0, self.current_length)
        raise ValueError(f"unknown row group {group!r}; choose from {', '.join(ROW_GROUPS)}")

    def readout_slots(self) -> torch.Tensor:
        """Slots the action head reads: OFT's convention, one position before each action slot.

        That is the last prompt token plus the first n_actions-1 action slots, located through the
        kept-position map (never from fixed offsets), the same for every strategy, dense included.
        """
        wanted = torch.arange(self.actions[0] - 1, self.actions[1] - 1)
        slots = torch.searchsorted(self.positions, wanted)
        if slots.max() >= self.current_length or not torch.equal(self.positions[slots], wanted):
            raise RuntimeError("an action read-out position was removed from the sequence")
        return slots

    def keep_slots(self, slots: torch.Tensor) -> None:
        """Record that only ``slots`` (sorted current slots) survive a removal."""
        self.positions = self.positions[slots]
        self._reset_caches()

    def visual_to_slots(self, visual_index: torch.Tensor) -> torch.Tensor:
        """Current slots of the given (present) visual indices."""
        return torch.searchsorted(self.positions, visual_index + self.visual_start)

    def copy(self) -> "TokenLayout":
        layout = TokenLayout(self.views, self.proprio, self.prompt, self.template, self.actions,
                             self.stop, self.positions.clone())
        # facts that do not depend on the tensors' identity carry over
        # facts about the current sequence carry over (tensors: the same objects; do not modify)
        if self._span_slots is not None:
            layout._span_slots = list(self._span_slots)
        layout._present = self._present
        return layout

    @classmethod
    def build(cls, grids: list[tuple[str, int, int]], n_proprio: int, n_prompt: int,
              n_template_head: int, n_template_tail: int, n_actions: int) -> "TokenLayout":
        """Lay out BOS | views | proprio | prompt | actions | STOP.

        ``n_template_head`` / ``n_template_tail``: how many of the prompt's first / last tokens
        belong to the fixed template ("In: What action should the robot take to" ... "?\\nOut:").
        """
        views, pos = [], 1
        for name, rows, cols in grids:
            views.append(ViewSpan(name, pos, rows, cols))
            pos += rows * cols
        proprio = (pos, pos + n_proprio)
        prompt = (proprio[1], proprio[1] + n_prompt)
        template = tuple(range(prompt[0], prompt[0] + n_template_head)) + tuple(
            range(prompt[1] - n_template_tail, prompt[1]))
        actions = (prompt[1], prompt[1] + n_actions)
        return cls(tuple(views), proprio, prompt, template, actions, actions[1])
