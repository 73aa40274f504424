"""A slot's state vector as named tensors, and back: the one place that knows the slot's layout by name.

A slot is one stream's states, float32 [state_size]: every recurrent layer's part, in the model's layer
order (server/model/layers.py). GetStreamState and SetStreamState show it as Keras does, one tensor per
state of each recurrent layer, in Keras order, without the batch axis:

    layer kind   its tensors                          slot part
    LSTM(u)      "<name>/0" = h [u], "<name>/1" = c [u]   [h (u), c (u)]
    GRU(u)       "<name>/0" = h [u]                    [h (u)]
    SimpleRNN(u) "<name>/0" = h [u]                    [h (u)]

So the tensors of a stream equal `[s[row] for s in layer.states]` of a stateful Keras model with batch
size 1 (row 0) fed the same sequence, for every recurrent layer in order.

Plain NumPy on the model's description (no Keras): the data plane splits and joins with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from server.errors import invalid_argument
from server.types import RecurrentLayerInfo, StateTensor

# States per layer kind, in Keras order (the cell's state_size).
STATES_PER_KIND = {"LSTM": 2, "GRU": 1, "SimpleRNN": 1}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str  # "<layer name>/<index>"
    units: int  # its shape is [units]


class StateLayout:
    """The named tensors of one model's slot, in slot order."""

    def __init__(self, layers: Sequence[RecurrentLayerInfo]) -> None:
        specs: list[TensorSpec] = []
        for layer in layers:
            count = STATES_PER_KIND.get(layer.kind, 1)
            specs += [TensorSpec(f"{layer.name}/{index}", layer.units) for index in range(count)]
        self.tensors = tuple(specs)
        self.state_size = sum(spec.units for spec in specs)
        self._position = {spec.name: index for index, spec in enumerate(specs)}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.tensors)

    def split(self, state: np.ndarray) -> tuple[StateTensor, ...]:
        """A slot's state float32 [state_size] as its named tensors, in slot order."""
        tensors, at = [], 0
        for spec in self.tensors:
            tensors.append(StateTensor(spec.name, (spec.units,), np.array(state[at:at + spec.units], np.float32)))
            at += spec.units
        return tuple(tensors)

    def join(self, tensors: Sequence[StateTensor], field: str = "tensors") -> np.ndarray:
        """The slot's state float32 [state_size] from named tensors given in any order, each expected name
        exactly once; INVALID_ARGUMENT naming the field (`tensors[1].shape`) for anything else."""
        parts: list[np.ndarray | None] = [None] * len(self.tensors)
        for index, tensor in enumerate(tensors):
            where = f"{field}[{index}]"
            position = self._position.get(tensor.name)
            if position is None:
                raise invalid_argument(f"{where}.name", f"{tensor.name!r} is not a state of this model; its state "
                                       f"tensors are {', '.join(self.names)}")
            if parts[position] is not None:
                raise invalid_argument(f"{where}.name", f"{tensor.name!r} is given twice")
            units = self.tensors[position].units
            if tuple(tensor.shape) != (units,):
                raise invalid_argument(f"{where}.shape", f"is {list(tensor.shape)}; {tensor.name!r} has shape "
                                       f"[{units}] (one stream's, without a batch axis)")
            values = np.asarray(tensor.values, dtype=np.float32).reshape(-1)
            if values.size != units:
                raise invalid_argument(f"{where}.values", f"has {values.size} values; shape [{units}] holds {units}")
            finite = np.isfinite(values)
            if not finite.all():
                bad = int(np.argmin(finite))
                raise invalid_argument(f"{where}.values", f"value {bad} is {values[bad]}; NaN and Inf are not accepted")
            parts[position] = values
        missing = [spec.name for spec, part in zip(self.tensors, parts, strict=True) if part is None]
        if missing:
            raise invalid_argument(field, f"{', '.join(missing)} missing; every state tensor of the model is needed: "
                                   f"{', '.join(self.names)}")
        return np.concatenate(parts).astype(np.float32, copy=False)  # type: ignore[arg-type]
