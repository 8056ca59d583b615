"""A layer's quantized store as tensors, and the latent weight it is quantized from.

:class:`SpatialStore` is a module of buffers only (never Parameters): the arrays of the packed,
block-sparse memory (layout in ``csrc/core/spatial_memory.h``), addressed by name. Being
buffers, they follow the layer through ``.to()``, ``.cuda()``, ``to("meta")``, ``to_empty()``,
DDP's broadcasts and the ``state_dict``, which holds them as flat tensors (safetensors-ready).
The compute ops read them where they are. Layout changes (growth, rewiring, a point write),
validation of a saved state, stats and the bloom filter go through the host-side C++ store
(``torch.classes.spatium.SpatialMemory``): :meth:`SpatialStore.host` builds it from the
buffers, :meth:`SpatialStore.install` takes a new one back.

The latent weight a trainable layer quantizes from is a
:class:`~spatium_torch.tracked.TrackedParameter`, which tells the layer when its contents may
have changed, so the store is re-quantized before the next forward and never goes stale.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import torch
from torch import nn

# Held while a load swaps a layer's state (the store's arrays, the latent weight and bias, the
# store's stamp) and while a forward takes its references to it, so that a forward running in
# another thread sees one state or the other. One lock for every layer: a module holding a lock
# could not be deep-copied or pickled, and both sides hold it for microseconds.
STATE_LOCK = threading.Lock()

STATE_FORMAT = 2
# Every array the store holds, as SpatialMemory.parts() names them. input_codes is
# empty for the default layout (input j at code j); bloom is the serialized bloom filter.
ARRAYS = (
    "input_codes",
    "region_keys",
    "region_begin",
    "bitmap",
    "block_begin",
    "code_begin",
    "scales",
    "codes",
    "bloom",
)
_DTYPES = dict(
    zip(ARRAYS, (torch.int64,) * 6 + (torch.float16, torch.uint8, torch.uint8), strict=True)
)
# The int64 `header` buffer: what the arrays mean, so a state_dict is tensors only.
HEADER = ("format", "in_features", "out_features", "bits", "region_bits", "frozen", "checksum")
# The first state format kept the store in one `_extra_state` dict with these values.
_V1_CONFIG = HEADER[1:]


class StoreArrays(NamedTuple):
    """The arrays the compute ops read, in their schemas' order (``torch.ops.spatium.*``)."""

    region_begin: torch.Tensor
    bitmap: torch.Tensor
    block_begin: torch.Tensor
    code_begin: torch.Tensor
    scales: torch.Tensor
    codes: torch.Tensor


class SpatialStore(nn.Module):
    """The quantized, block-sparse weights of one layer: buffers named as in :data:`ARRAYS`
    plus ``header``. Built from a host memory (``torch.classes.spatium.SpatialMemory``) and
    placed on ``device``."""

    def __init__(self, memory: torch.ScriptObject, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.in_features = memory.in_features()
        self.out_features = memory.out_features()
        self.bits = memory.bits()
        self.region_bits = memory.region_bits()
        self.frozen = False
        self._host: tuple[tuple, torch.ScriptObject] | None = None
        self.register_buffer("header", torch.zeros(len(HEADER), dtype=torch.int64))
        for name in ARRAYS:
            self.register_buffer(name, None)
        self.install(memory, device)

    # --- what the kernels read --------------------------------------------------------------
    def arrays(self) -> StoreArrays:
        """The six arrays the compute ops take."""
        b = self._buffers
        return StoreArrays(
            b["region_begin"], b["bitmap"], b["block_begin"], b["code_begin"], b["scales"],
            b["codes"],
        )  # fmt: skip

    @property
    def device(self) -> torch.device:
        """Where the arrays live."""
        return self._buffers["codes"].device

    @property
    def num_regions(self) -> int:
        """Regions of the input space (blocks per neuron)."""
        return int(self._buffers["region_keys"].numel())

    def region_sizes(self) -> torch.Tensor:
        """``[regions]`` int64: how many inputs each region holds."""
        return self._buffers["region_begin"].diff()

    def region_mask(self) -> torch.Tensor:
        """``[out, regions]`` bool: which blocks (neuron x region) are active."""
        words = self._buffers["bitmap"].view(torch.uint8)
        shifts = torch.arange(8, dtype=torch.uint8, device=words.device)
        bits = (words.unsqueeze(1) >> shifts) & 1
        count = self.out_features * self.num_regions
        return bits.flatten()[:count].view(self.out_features, self.num_regions).bool()

    # --- the host-side store ----------------------------------------------------------------
    def host(self) -> torch.ScriptObject:
        """The host-side C++ store holding these arrays (rebuilt after they change). Raises
        ValueError on the meta device, where the arrays hold no values."""
        key = tuple((id(t), t._version) for t in self._store_tensors())
        if self._host is not None and self._host[0] == key:
            return self._host[1]
        if self.device.type == "meta":
            raise ValueError(
                "SpatialStore: the store is on the meta device and holds no values; move the "
                "model with to_empty() and load a state_dict first"
            )
        memory = build_host(self, {name: self._buffers[name] for name in ARRAYS})
        self._host = (key, memory)
        return memory

    def install(self, memory: torch.ScriptObject, device: torch.device | str | None = None) -> None:
        """Makes the arrays those of ``memory`` (a host store with this store's bits and
        region_bits; its sizes may differ), on ``device`` (default: where they are now)."""
        device = self.device if device is None else torch.device(device)
        parts = memory.parts()
        # Every array is moved before any is swapped in: a failed move changes nothing.
        self._buffers.update({name: parts[name].to(device) for name in ARRAYS})
        self.in_features = memory.in_features()
        self.out_features = memory.out_features()
        if device.type != "meta":
            self._host = (tuple((id(t), t._version) for t in self._store_tensors()), memory)

    def _apply(self, fn: Any, recurse: bool = True) -> SpatialStore:
        # The arrays hold codes, not values: a move (.to(device), to_empty) moves them, a cast
        # (.half(), .double()) leaves them as they are.
        before = {name: self._buffers[name] for name in ARRAYS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def _store_tensors(self) -> list[torch.Tensor]:
        return [self._buffers[name] for name in ARRAYS]

    def nbytes(self) -> int:
        """Bytes of every array (the header aside): the store's real footprint."""
        return sum(t.numel() * t.element_size() for t in self._store_tensors())

    # --- state_dict ---------------------------------------------------------------------------
    def _header_values(self, checksum: int) -> list[int]:
        return [
            STATE_FORMAT, self.in_features, self.out_features, self.bits, self.region_bits,
            int(self.frozen), checksum,
        ]  # fmt: skip

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # The header is filled in when saved: the checksum covers the arrays as they are now.
        checksum = self.host().checksum() if self.device.type != "meta" else 0
        self._buffers["header"] = torch.tensor(
            self._header_values(checksum), dtype=torch.int64, device=self.device
        )
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def check_state(self, state: dict[str, Any], prefix: str) -> torch.ScriptObject:
        """Validates the store's part of a state_dict (keys ``prefix + name``) against this
        store's configuration and returns the host memory it describes; changes nothing.
        Raises ValueError naming the problem (TypeError for an entry that is not a tensor)."""
        where = f"SpatialLayer state at {prefix!r}"
        missing = [prefix + k for k in ("header", *ARRAYS) if prefix + k not in state]
        if missing:
            raise ValueError(f"{where}: not a SpatialLayer store (missing {missing})")
        for name in ("header", *ARRAYS):
            check_tensor(state, prefix + name, where)
        header = state[prefix + "header"]
        if tuple(header.shape) != (len(HEADER),):
            raise ValueError(f"{where}: header must be an int64 tensor of {len(HEADER)} values")
        saved = dict(zip(HEADER, header.tolist(), strict=True))
        if saved["format"] != STATE_FORMAT:
            raise ValueError(f"{where}: unknown store format {saved['format']!r}")
        for key in ("in_features", "out_features", "bits", "region_bits"):
            if saved[key] != getattr(self, key):
                raise ValueError(
                    f"{where}: {key} is {saved[key]} in the state but {getattr(self, key)} in "
                    "this layer"
                )
        arrays = {}
        for name in ARRAYS:
            tensor = state[prefix + name]
            if tensor.dtype != _DTYPES[name]:
                raise ValueError(f"{where}: {name} must be a {_DTYPES[name]} tensor")
            arrays[name] = tensor
        memory = build_host(self, arrays, where)
        if memory.checksum() != saved["checksum"]:
            raise ValueError(f"{where}: checksum mismatch (damaged memory)")
        return memory

    def saved_frozen(self, state: dict[str, Any], prefix: str) -> bool | None:
        """Whether the state at ``prefix`` was saved frozen (None when it has no header)."""
        header = state.get(prefix + "header")
        if not isinstance(header, torch.Tensor) or header.numel() != len(HEADER):
            return None
        return bool(header[HEADER.index("frozen")])

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The arrays' sizes follow the saved layout, so they are replaced, not copied into.
        if not any(key.startswith(prefix) for key in state_dict):
            missing_keys.extend(prefix + name for name in ("header", *ARRAYS))
            return
        known = {prefix + name for name in ("header", *ARRAYS)}
        unexpected_keys.extend(
            k for k in state_dict if k.startswith(prefix) and k not in known and "." not in
            k[len(prefix):]
        )  # fmt: skip
        if all(state_dict.get(prefix + name) is self._buffers[name] for name in ARRAYS):
            return  # this store's own arrays: its layer's load installed them already
        memory = self.check_state(state_dict, prefix)
        if self.device.type == "meta":
            return  # as torch does for meta tensors: nothing to copy into
        with STATE_LOCK:
            self.install(memory)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        return {**state, "_host": None}  # a cache; copies and pickles rebuild it

    def extra_repr(self) -> str:
        return (
            f"{self.out_features}x{self.in_features}, bits={self.bits}, "
            f"region_bits={self.region_bits}"
        )


def check_tensor(state: dict[str, Any], key: str, where: str) -> None:
    """Raises TypeError naming ``key`` unless ``state[key]`` is a tensor."""
    value = state[key]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: {key!r} must be a tensor, got {type(value).__name__}")


def build_host(
    store: SpatialStore, arrays: dict[str, torch.Tensor], where: str = "SpatialStore"
) -> torch.ScriptObject:
    """The host memory of ``arrays`` (named as :data:`ARRAYS`) with the store's configuration,
    every array checked. Raises ValueError for inconsistent arrays."""
    try:
        return torch.classes.spatium.SpatialMemory.from_parts(
            store.out_features,
            store.in_features,
            store.bits,
            store.region_bits,
            {name: arrays[name].detach().cpu() for name in ARRAYS},
        )
    except (ValueError, TypeError, RuntimeError) as error:
        raise ValueError(f"{where}: damaged or inconsistent memory: {error}") from None


def upgrade_first_format(state_dict: dict[str, Any], prefix: str, where: str) -> None:
    """Rewrites a layer state of the first format (the store as one `_extra_state` dict) into
    the flat tensors of this one; the store's checks then apply as to any state."""
    extra = state_dict.pop(prefix + "_extra_state")
    if not isinstance(extra, dict) or extra.get("format") != 1:
        raise ValueError(f"{where}: _extra_state is not a SpatialLayer state of format 1")
    missing = [k for k in (*_V1_CONFIG, *ARRAYS) if k not in extra]
    if missing:
        raise ValueError(f"{where}: not a SpatialLayer state (missing {missing})")
    config = [int(extra[k]) for k in _V1_CONFIG]
    state_dict[prefix + "store.header"] = torch.tensor([STATE_FORMAT, *config])
    for name in ARRAYS:
        state_dict[prefix + "store." + name] = extra[name]
    scales = extra["scales"]
    if isinstance(scales, torch.Tensor) and scales.dtype == torch.int16:
        state_dict[prefix + "store.scales"] = scales.view(torch.float16)  # fp16 bits then
