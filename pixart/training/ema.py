"""Exponential moving average of the trained weights (PixArt-α: rate 0.9999, updated after every optimizer step).

The EMA copy starts equal to the weights (after any `--load_from`); parameters that are not trained (the null
caption `y_embedding`) are saved from the model as they are.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

_ema = ops.MultitypeFuncGraph("ema")
_ema_in_place = ops.MultitypeFuncGraph("ema_in_place")


@_ema.register("Number", "Tensor", "Tensor")
def _ema_update(rate, average, param):
    ops.assign(average, average * rate + param * (1.0 - rate))
    return True


@_ema_in_place.register("Function", "Tensor", "Tensor", "Tensor")
def _ema_in_place_update(kernel, hyper, average, param):
    return kernel(average, param, hyper)


class EMA(nn.Cell):
    def __init__(self, params, rate: float = 0.9999):
        super().__init__(auto_prefix=False)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"ema rate must be in [0, 1), got {rate}")
        self.rate = float(rate)
        self.params = ParameterTuple(list(params))
        self.averages = ParameterTuple([Parameter(Tensor(p.asnumpy().astype(np.float32)), name=f"ema.{p.name}",
                                                  requires_grad=False) for p in self.params])
        self.hyper_map = ops.HyperMap()
        # one in-place kernel per parameter, no parameter-sized temporaries (see AdamW.update_in_place), set by
        # `pixart.cpu.accelerate_step`
        self.kernel = None

    def construct(self, after=None):
        """Average in the current weights; `after` (a scalar from the in-place optimizer update) orders the in-place
        kernels after the weights' writes."""
        if self.kernel is not None and after is not None:
            hyper = ops.stack([Tensor(self.rate, ms.float32), after.reshape(()).astype(ms.float32)])
            return ops.addn(self.hyper_map(ops.partial(_ema_in_place, self.kernel, hyper), self.averages,
                                           self.params))
        return self.hyper_map(ops.partial(_ema, self.rate), self.averages, self.params)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The averages under the model's parameter names."""
        return {p.name: a.asnumpy() for p, a in zip(self.params, self.averages)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for p, a in zip(self.params, self.averages):
            if p.name not in state:
                raise ValueError(f"EMA state lacks {p.name}")
            a.set_data(Tensor(state[p.name].astype(np.float32)))
