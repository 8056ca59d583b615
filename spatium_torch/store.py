"""A layer's quantized store as tensors, and the latent weight it is quantized from.

:class:`SpatialStore` is a module of buffers only (never Parameters): the arrays of the packed,
block-sparse memory (layout in ``csrc/core/spatial_memory.h``), addressed by name. Being
buffers, they follow the layer through ``.to()``, ``.cuda()``, ``to("meta")``, ``to_empty()``
and DDP's broadcasts. The ``state_dict`` holds the arrays that define the memory as one uint8
tensor (:meth:`SpatialStore.packed`, safetensors-ready); a load derives the others.
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
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from spatium_torch.reference import describe

# Held while a load swaps a layer's state (the store's arrays, the latent weight and bias, the
# store's stamp) and while a forward takes its references to it, so that a forward running in
# another thread sees one state or the other. One lock for every layer: a module holding a lock
# could not be deep-copied or pickled, and both sides hold it for microseconds.
STATE_LOCK = threading.Lock()

# The state_dict holds a store as one uint8 tensor, `packed`: the header (HEADER, one int64
# each), then the bitmap (int64 words), the scales (fp16) and the codes, little-endian. The
# other arrays are derived from these and the layer's input positions. One entry, not ten:
# every entry of a torch.save file costs about 260 bytes, as much as a small layer's bitmap,
# directory and header together.
STATE_FORMAT = 3
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
# What the packed arrays mean; "bits" holds the code format (the width, or nf4's format).
HEADER = ("format", "in_features", "out_features", "bits", "region_bits", "frozen", "checksum")
_HEADER_BYTES = 8 * len(HEADER)
# What the packed state holds after its header; the rest of ARRAYS is derived on load.
_PACKED = ("bitmap", "scales", "codes")
# The second format saved every array as its own entry, the header as an int64 tensor.
_SECOND_FORMAT = 2
# The first format kept the store in one `_extra_state` dict with these values.
_V1_CONFIG = HEADER[1:]


class StoreArrays(NamedTuple):
    """The arrays the compute ops read, in their schemas' order (``torch.ops.spatium.*``)."""

    region_begin: torch.Tensor
    bitmap: torch.Tensor
    block_begin: torch.Tensor
    code_begin: torch.Tensor
    scales: torch.Tensor
    codes: torch.Tensor


def read_header(state: Mapping[str, Any], prefix: str) -> dict[str, int]:
    """The header (HEADER's fields) of a saved store, keys ``prefix + name``, of this format or
    the second, whatever layer it is loaded into. Raises ValueError naming the problem
    (TypeError for an entry that is not a tensor)."""
    where = f"SpatialLayer state at {prefix!r}"
    if prefix + "packed" in state:
        check_tensor(state, prefix + "packed", where)
        packed = state[prefix + "packed"]
        if packed.dtype != torch.uint8 or packed.dim() != 1 or len(packed) < _HEADER_BYTES:
            raise ValueError(
                f"{where}: packed must be a 1-D uint8 tensor of at least {_HEADER_BYTES} bytes"
            )
        values, expected_format = (
            _host_bytes(packed[:_HEADER_BYTES]).view(torch.int64),
            STATE_FORMAT,
        )
    elif prefix + "header" in state:
        check_tensor(state, prefix + "header", where)
        values, expected_format = state[prefix + "header"], _SECOND_FORMAT
        if values.dtype != torch.int64 or tuple(values.shape) != (len(HEADER),):
            raise ValueError(f"{where}: header must be an int64 tensor of {len(HEADER)} values")
    else:
        raise ValueError(f"{where}: not a SpatialLayer store (no {prefix + 'packed'!r})")
    saved = dict(zip(HEADER, values.tolist(), strict=True))
    if saved["format"] != expected_format:
        raise ValueError(f"{where}: unknown store format {saved['format']!r}")
    return saved


class SpatialStore(nn.Module):
    """The quantized, block-sparse weights of one layer: buffers named as in :data:`ARRAYS`.
    Built from a host memory (``torch.classes.spatium.SpatialMemory``) and placed on
    ``device``."""

    def __init__(self, memory: torch.ScriptObject, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.in_features = memory.in_features()
        self.out_features = memory.out_features()
        self.code_format = memory.format()
        self.region_bits = memory.region_bits()
        self.frozen = False
        self._host: tuple[tuple, torch.ScriptObject] | None = None
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
        return bitmap_mask(self._buffers["bitmap"], self.out_features, self.num_regions)

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
        """Makes the arrays those of ``memory`` (a host store with this store's code format and
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
    def packed(self) -> torch.Tensor:
        """The store's state: one uint8 tensor holding the header, bitmap, scales and codes (see
        :data:`STATE_FORMAT`), on the store's device. Its checksum covers the arrays as they
        are now."""
        arrays = [self._buffers[name] for name in _PACKED]
        if self.device.type == "meta":
            size = _HEADER_BYTES + sum(t.numel() * t.element_size() for t in arrays)
            return torch.empty(size, dtype=torch.uint8, device="meta")
        header = [
            STATE_FORMAT, self.in_features, self.out_features, self.code_format, self.region_bits,
            int(self.frozen), self.host().checksum(),
        ]  # fmt: skip
        parts = [torch.tensor(header, dtype=torch.int64), *(t.detach().cpu() for t in arrays)]
        return torch.cat([t.contiguous().view(torch.uint8) for t in parts]).to(self.device)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "packed"] = self.packed()

    def saved_header(self, state: dict[str, Any], prefix: str) -> dict[str, int]:
        """The header of the store's entries in ``state`` (keys ``prefix + name``), of this
        format or the second, checked against this store's configuration. Raises ValueError
        naming the problem (TypeError for an entry that is not a tensor)."""
        where = f"SpatialLayer state at {prefix!r}"
        saved = read_header(state, prefix)
        for key in ("in_features", "out_features", "region_bits"):
            if saved[key] != getattr(self, key):
                raise ValueError(
                    f"{where}: {key} is {saved[key]} in the state but {getattr(self, key)} in "
                    "this layer"
                )
        if saved["bits"] != self.code_format:
            raise ValueError(
                f"{where}: the codes are {describe(saved['bits'])} in the state but "
                f"{describe(self.code_format)} in this layer"
            )
        return saved

    def check_state(
        self, state: dict[str, Any], prefix: str, sorted_codes: torch.Tensor
    ) -> torch.ScriptObject:
        """Validates the store's part of a state_dict (keys ``prefix + name``) against this
        store's configuration and returns the host memory it describes; changes nothing. The
        inputs' sorted Morton codes (``sorted_codes``, the layer's) lay out a packed state.
        Raises ValueError naming the problem (TypeError for an entry that is not a tensor)."""
        where = f"SpatialLayer state at {prefix!r}"
        saved = self.saved_header(state, prefix)
        if saved["format"] == STATE_FORMAT:
            arrays = self._unpacked(_host_bytes(state[prefix + "packed"]), sorted_codes, where)
        else:
            arrays = {}
            for name in ARRAYS:
                if prefix + name not in state:
                    raise ValueError(f"{where}: not a SpatialLayer store (missing {prefix + name})")
                check_tensor(state, prefix + name, where)
                if state[prefix + name].dtype != _DTYPES[name]:
                    raise ValueError(f"{where}: {name} must be a {_DTYPES[name]} tensor")
                arrays[name] = state[prefix + name]
        memory = build_host(self, arrays, where)
        if memory.checksum() != saved["checksum"]:
            raise ValueError(f"{where}: checksum mismatch (damaged memory)")
        return memory

    def _unpacked(
        self, packed: torch.Tensor, sorted_codes: torch.Tensor, where: str
    ) -> dict[str, torch.Tensor]:
        """The arrays of a packed state (host bytes, header included): its bitmap, scales and
        codes, the rest derived from them and the inputs' layout."""
        layout = torch.classes.spatium.SpatialMemory(
            self.out_features, sorted_codes, self.code_format, self.region_bits
        )
        data = packed[_HEADER_BYTES:]
        bitmap_bytes = 8 * len(layout.parts()["bitmap"])
        if len(data) < bitmap_bytes:
            raise ValueError(
                f"{where}: packed holds {len(data)} bytes after its header; the bitmap alone "
                f"takes {bitmap_bytes}"
            )
        bitmap = data[:bitmap_bytes].view(torch.int64)
        layout.set_active(bitmap_mask(bitmap, self.out_features, layout.num_regions()))
        arrays = dict(layout.parts())
        scale_bytes = 2 * len(arrays["scales"])
        expected = bitmap_bytes + scale_bytes + len(arrays["codes"])
        if len(data) != expected:
            raise ValueError(
                f"{where}: packed holds {len(data)} bytes after its header; its bitmap calls "
                f"for {expected}"
            )
        arrays["bitmap"] = bitmap  # as saved: bits past the last neuron are refused
        arrays["scales"] = data[bitmap_bytes : bitmap_bytes + scale_bytes].view(torch.float16)
        arrays["codes"] = data[bitmap_bytes + scale_bytes :]
        return arrays

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
        # The layer checks and installs the store (the arrays are laid out by its input
        # positions) before this runs; here the keys are accounted for.
        names = {k[len(prefix) :] for k in state_dict if k.startswith(prefix)}
        if "packed" in names or not names & {"header", *ARRAYS}:
            known = {"packed"}
        else:
            known = {"header", *ARRAYS}
        missing_keys.extend(prefix + name for name in sorted(known - names))
        unexpected_keys.extend(prefix + name for name in sorted(names - known) if "." not in name)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        return {**state, "_host": None}  # a cache; copies and pickles rebuild it

    def extra_repr(self) -> str:
        return (
            f"{self.out_features}x{self.in_features}, codes={describe(self.code_format)}, "
            f"region_bits={self.region_bits}"
        )


def check_tensor(state: Mapping[str, Any], key: str, where: str) -> None:
    """Raises TypeError naming ``key`` unless ``state[key]`` is a tensor."""
    value = state[key]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: {key!r} must be a tensor, got {type(value).__name__}")


def bitmap_mask(bitmap: torch.Tensor, neurons: int, regions: int) -> torch.Tensor:
    """``[neurons, regions]`` bool: the blocks an int64 ``bitmap`` marks active (neuron-major,
    bit i of word w is block 64 w + i)."""
    words = bitmap.view(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=words.device)
    bits = (words.unsqueeze(1) >> shifts) & 1
    return bits.flatten()[: neurons * regions].view(neurons, regions).bool()


def _host_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of ``tensor`` starting at offset 0, so that views of it at aligned offsets
    as wider types are allowed."""
    return tensor.detach().cpu().clone(memory_format=torch.contiguous_format)


def build_host(
    store: SpatialStore, arrays: dict[str, torch.Tensor], where: str = "SpatialStore"
) -> torch.ScriptObject:
    """The host memory of ``arrays`` (named as :data:`ARRAYS`) with the store's configuration,
    every array checked. Raises ValueError for inconsistent arrays."""
    try:
        return torch.classes.spatium.SpatialMemory.from_parts(
            store.out_features,
            store.in_features,
            store.code_format,
            store.region_bits,
            {name: arrays[name].detach().cpu() for name in ARRAYS},
        )
    except (ValueError, TypeError, RuntimeError) as error:
        raise ValueError(f"{where}: damaged or inconsistent memory: {error}") from None


def upgrade_first_format(state_dict: dict[str, Any], prefix: str, where: str) -> None:
    """Rewrites a layer state of the first format (the store as one `_extra_state` dict) into
    the flat tensors of the second; the store's checks then apply as to any state."""
    extra = state_dict.pop(prefix + "_extra_state")
    if not isinstance(extra, dict) or extra.get("format") != 1:
        raise ValueError(f"{where}: _extra_state is not a SpatialLayer state of format 1")
    missing = [k for k in (*_V1_CONFIG, *ARRAYS) if k not in extra]
    if missing:
        raise ValueError(f"{where}: not a SpatialLayer state (missing {missing})")
    config = [int(extra[k]) for k in _V1_CONFIG]
    state_dict[prefix + "store.header"] = torch.tensor([_SECOND_FORMAT, *config])
    for name in ARRAYS:
        state_dict[prefix + "store." + name] = extra[name]
    scales = extra["scales"]
    if isinstance(scales, torch.Tensor) and scales.dtype == torch.int16:
        state_dict[prefix + "store.scales"] = scales.view(torch.float16)  # fp16 bits then
