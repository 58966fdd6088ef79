"""LiveBytes: every tensor storage a fake-tensor trace creates, followed from creation to release (the planner's
activations, ds_vlm/memplan/trace.py)."""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    unset_fake_temporarily,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

_MISSING = object()

MOVED = 0  # an event's size that marks its storage as moved out (LiveBytes.moved); storages of 0 bytes are not kept
KNOWN_NUMEL = 1 << 22  # host-side values followed through the trace up to this size (index tensors)
INDEX_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default}


class KnownValues:
    """The host values a trace follows (LiveBytes' docstring): fake tensor -> its real value, and the fakes that
    stand for views of real inputs (they allocate nothing)."""

    def __init__(self, fake_mode):
        self.fake_mode = fake_mode
        self.known = WeakIdKeyDictionary()  # fake tensor -> its real value
        self.views = WeakIdKeyDictionary()  # fakes standing for views of real inputs

    def real_of(self, value):
        """`value`'s real value: itself unless a fake tensor; a fake's remembered one, else _MISSING."""
        if isinstance(value, FakeTensor):
            return self.known.get(value, _MISSING)
        return value

    @staticmethod
    def small(tensor) -> bool:
        limit = KNOWN_NUMEL if tensor.is_floating_point() else 64 * KNOWN_NUMEL
        return tensor.numel() <= limit

    def as_positions(self, indices) -> list:
        """Known boolean masks among `indices` as the positions they select, one long tensor per masked
        dimension (what `x[mask]` needs values for)."""
        out = []
        for index in indices:
            real = self.real_of(index) if index is not None else _MISSING
            if real is _MISSING or real.dtype != torch.bool:
                out.append(index)
                continue
            with unset_fake_temporarily():
                positions = real.nonzero(as_tuple=True)
            for p in positions:
                fake = self.fake_mode.from_tensor(p)
                self.known[fake] = p
                out.append(fake)
        return out

    def run(self, func, args, kwargs):
        """`func` on fake tensors; where every input's value is known and small, on the real values too, its
        fake outputs remembering theirs (shapes first: values only when the outputs are small, or when the shapes
        depend on them)."""
        flat, spec = tree_flatten((args, kwargs))
        reals = [self.real_of(v) for v in flat]
        if all(r is not _MISSING for r in reals) and all(self.small(v) for v in flat if isinstance(v, torch.Tensor)):
            out = None
            try:  # the shapes first (cheap); values too when the outputs are small
                out = func(*args, **kwargs)
                follow = all(self.small(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            except (DynamicOutputShapeException, DataDependentOutputException):  # nonzero, .item(): values
                follow = True
            if follow:
                return self._on_values(func, reals, spec)
            if out is not None:
                return out
        if func in INDEX_OPS and len(args) > 1 and isinstance(args[1], (list, tuple)):
            args = (args[0], self.as_positions(args[1]), *args[2:])
        return func(*args, **kwargs)

    def _on_values(self, func, reals: list, spec):
        with unset_fake_temporarily():
            real_args, real_kwargs = tree_unflatten(reals, spec)
            real_out = func(*real_args, **real_kwargs)
            inputs = {r.untyped_storage().data_ptr() for r in reals if isinstance(r, torch.Tensor)}
        out = tree_map(lambda r: self.fake_mode.from_tensor(r) if isinstance(r, torch.Tensor) else r, real_out)
        for fake, real in zip(tree_leaves(out), tree_leaves(real_out)):
            if isinstance(fake, torch.Tensor):
                self.known[fake] = real
                if real.untyped_storage().data_ptr() in inputs:  # a view: no new memory
                    self.views[fake] = True
        return out


class _TraceMode(TorchDispatchMode):
    """LiveBytes' dispatch mode: each op run through the known values, its new storages given to the tracker."""

    def __init__(self, tracker: "LiveBytes"):
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [v for v in tree_flatten((args, kwargs))[0] if isinstance(v, torch.Tensor)]
        out = self.tracker.values.run(func, args, kwargs)
        self.tracker.created(tensors, out)
        return out


class LiveBytes:
    """Every tensor storage created while active (`mode`, a TorchDispatchMode above `fake_mode`), with when it
    was created and freed: the peak of what was alive, leaving out chosen storages (the parameters' gradients,
    counted with the model states).

    Fake tensors hold no values, so an op whose output shape depends on values (`repeat_interleave` over the
    image grid, `nonzero`) cannot run on them. Values that come from the host (the micro-batch's real tensors:
    image grids, positions, lengths) are followed (`KnownValues`): an op whose tensor inputs all have known
    values and are small runs on the real values too, and its fake output remembers them. The model's
    parameters and activations are never known, so everything that costs memory runs on fake tensors."""

    def __init__(self, fake_mode):
        self.events: list[tuple[int, int]] = []  # (+bytes or -bytes, storage key), in order
        self.values = KnownValues(fake_mode)
        self.mode = _TraceMode(self)
        self._refs: dict[int, int] = {}    # storage key -> tensors alive on it
        self._serial: dict[int, int] = {}  # storage key -> the serial number of its current lifetime
        self.first_grad: Optional[int] = None  # the event at which the first gradient was accumulated
        self.part = "other"                     # what is running (set by the trace's module hooks)
        self.part_of: dict[int, str] = {}       # storage serial -> the part running when it was made

    def created(self, inputs: list, out) -> None:
        """The storages under an op's outputs `out` that are new: a view of an input allocates nothing (of a
        storage followed already it is one more tensor on it; of one that was there before the trace, parameters
        and the batch, it is not new memory at all)."""
        before = {t.untyped_storage()._cdata for t in inputs if t.untyped_storage()._cdata not in self._refs}
        for tensor in tree_leaves(out):
            if (isinstance(tensor, torch.Tensor) and tensor not in self.values.views
                    and tensor.untyped_storage()._cdata not in before):
                self._add(tensor)

    def _add(self, tensor) -> None:
        """A storage lives while any tensor on it does (tensors keep their Python objects while alive; a
        storage's Python wrapper does not, so it cannot be followed itself)."""
        storage = tensor.untyped_storage()
        key = storage._cdata  # an address: reused once freed, so each lifetime gets its own serial number
        if key not in self._refs:
            self._refs[key] = 0
            self._serial[key] = len(self.events)
            self.part_of[self._serial[key]] = self.part
            self.events.append((int(storage.nbytes()), self._serial[key]))
        self._refs[key] += 1
        weakref.finalize(tensor, self._release, key, self._serial[key], int(storage.nbytes()))

    def _release(self, key: int, serial: int, size: int) -> None:
        self._refs[key] -= 1
        if not self._refs[key]:
            del self._refs[key], self._serial[key]
            self.events.append((-size, serial))

    def moved(self, tensor) -> None:
        """`tensor`'s storage is done with (a parameter's accumulated gradient, which ZeRO 2/3 move into their
        buckets at once): `peak(moved=True)` counts it released here."""
        if self.first_grad is None:  # ZeRO-1/2 allocate their buckets and gradient partitions from here on
            self.first_grad = len(self.events)
        key = tensor.untyped_storage()._cdata
        if key in self._serial:
            self.events.append((MOVED, self._serial[key]))

    def parts_at_peak(self, leave_out: set[int] = frozenset()) -> dict[str, int]:
        """The storages alive at the peak of `peak(leave_out)`, in bytes by the part that made them."""
        live, best, at = 0, -1, 0
        for i, (size, key) in enumerate(self.events):
            if key not in leave_out and size != MOVED:
                live += size
                if live > best:
                    best, at = live, i
        alive: dict[int, int] = {}
        for size, key in self.events[:at + 1]:
            if key in leave_out or size == MOVED:
                continue
            if size > 0:
                alive[key] = size
            else:
                alive.pop(key, None)
        out: dict[str, int] = {}
        for key, size in alive.items():
            out[self.part_of.get(key, "other")] = out.get(self.part_of.get(key, "other"), 0) + size
        return out

    def label(self, module, name: str) -> None:
        """Storages made while `module` runs forward (and recomputes) are `name`'s."""
        saved: list[str] = []

        def enter(*_):
            saved.append(self.part)
            self.part = name

        def leave(*_):
            self.part = saved.pop() if saved else "other"

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)

    def serials(self, tensors) -> set[int]:
        """The serial numbers of the storages under `tensors` (alive now)."""
        return {self._serial[t.untyped_storage()._cdata] for t in tensors
                if t.untyped_storage()._cdata in self._serial}

    def peak(self, leave_out: set[int] = frozenset(), moved: bool = False, start: int = 0,
             stop: Optional[int] = None) -> int:
        """The most bytes alive at once (at events start..stop), leaving out the storages `leave_out`; with
        `moved`, each storage marked by `moved()` counted released there (and not again at its real release)."""
        live = best = 0
        sizes, gone = {}, set()
        for i, (size, key) in enumerate(self.events[:stop]):
            if key in leave_out:
                continue
            if size == MOVED:
                if moved and key not in gone:
                    live -= sizes.get(key, 0)
                    gone.add(key)
                continue
            if size > 0:
                sizes[key] = size
            elif key in gone:
                continue
            live += size
            if i >= start:
                best = max(best, live)
        return best
