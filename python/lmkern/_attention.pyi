from typing import Any, Literal, Optional, Tuple, Union, overload

import numpy as np
import numpy.typing as npt

ArrayLike = Any  # numpy.ndarray or a CUDA array (torch, cupy, jax, lmkern.cuda.DeviceArray)
IndexLike = Optional[npt.ArrayLike]

def attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, causal: bool = ..., scale: Optional[float] = ...,
              q_pos: IndexLike = ..., kv_pos: IndexLike = ..., kv_lens: IndexLike = ...,
              return_lse: bool = ..., out: Optional[ArrayLike] = ...) -> Union[ArrayLike, Tuple[ArrayLike, ArrayLike]]:
    """q (B,N,Hq,D), k (B,M,Hkv,D), v (B,M,Hkv,E) -> out (B,N,Hq,E) [, lse (B,N,Hq)]"""
def rope(x: ArrayLike, positions: npt.ArrayLike, *, base: float = ..., rotary_dim: Optional[int] = ...,
         style: Literal["half", "interleaved"] = ..., inverse: bool = ..., out: Optional[ArrayLike] = ...) -> ArrayLike:
    """x (B,T,G,D), positions (T,) or (B,T) -> (B,T,G,D)"""
def rope_(x: ArrayLike, positions: npt.ArrayLike, *, base: float = ..., rotary_dim: Optional[int] = ...,
          style: Literal["half", "interleaved"] = ..., inverse: bool = ...) -> ArrayLike: ...

class KVCache:
    batch: int
    max_len: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    dtype: np.dtype
    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, v_head_dim: Optional[int] = ...,
                 *, dtype: npt.DTypeLike = ..., device: Optional[str] = ...) -> None: ...
    def append(self, k: ArrayLike, v: ArrayLike, *, positions: IndexLike = ..., lengths: IndexLike = ...) -> "KVCache": ...
    def attend(self, q: ArrayLike, *, causal: bool = ..., q_pos: IndexLike = ..., scale: Optional[float] = ...,
               return_lse: bool = ...) -> Union[ArrayLike, Tuple[ArrayLike, ArrayLike]]: ...
    def reset(self) -> None: ...
    @property
    def k(self) -> ArrayLike: ...
    @property
    def v(self) -> ArrayLike: ...
    @property
    def positions(self) -> ArrayLike: ...
    @property
    def lengths(self) -> np.ndarray: ...
    @property
    def nbytes(self) -> int: ...

def check_attention_args(fn: str, q: Any, k: Any, v: Any, q_pos: Any = ..., kv_pos: Any = ..., kv_lens: Any = ...,
                         prefix_k: Any = ..., prefix_v: Any = ..., P: Optional[int] = ...) -> Any: ...
def attention_impl(fn: str, q: Any, k: Any, v: Any, **kwargs: Any) -> Any: ...
