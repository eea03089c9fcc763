"""What to sample and when to stop, as one value: :class:`SamplingParams`.

``jaxsft.generate``, ``Sampler.generate``, ``trainer.generate`` and the facade's HF keywords all
end here: their sampling keywords become one ``SamplingParams`` in one place
(:meth:`SamplingParams.of`), validated once at construction, before any work. How a call runs
(``batch_size``, the KV budget, the mesh) and how its result is shaped (``return_tokens``,
``chat``) are not sampling: they stay arguments of the call, and no sample depends on them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from jaxsft.generation.sampling import Mode

MAX_EOS_IDS = 8  # EOS ids are a padded run-time array of this size (no recompile per tokenizer)


def is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


class SamplingError(ValueError, TypeError):
    """A refused sampling argument (a wrong type or a wrong value): catchable as either, as the checks it
    replaced raised both."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """The sampling and stopping arguments of a generate call (frozen; checked at construction).

    * ``max_new_tokens``: the token budget per row; None: HF's default from the model's generation config.
    * ``temperature``: 0 is greedy (argmax); otherwise sampling with optional ``top_k`` / ``top_p``
      (HF's order: temperature -> top-k -> top-p).
    * ``num_return_sequences``: samples per prompt (rows are prompt-major).
    * ``seed``: a row's sample depends on it, its prompt and its sample index only. None: 0 for
      ``jaxsft.generate`` / ``Sampler``; ``trainer.generate`` advances a seed per call.
    * ``stop``: strings that end a row (its text is cut before the first), checked on the host every
      ``stop_check_every`` decode steps.
    * ``eos_token_ids``: None: the tokenizer's EOS plus the model config's; ``()`` never stops early.
    * ``skip_special_tokens``: how texts are decoded.
    """

    max_new_tokens: Optional[int] = None
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    num_return_sequences: int = 1
    seed: Optional[int] = None
    stop: Union[str, Sequence[str]] = ()
    eos_token_ids: Optional[Sequence[int]] = None
    skip_special_tokens: bool = True
    stop_check_every: int = 32

    def __post_init__(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise SamplingError(f"SamplingParams: {name}={getattr(self, name)!r} {rule}")

        m = self.max_new_tokens
        if m is not None and (not is_int(m) or m < 1):
            fail("max_new_tokens", "must be an integer >= 1 (or None for the model's generation config).")
        t = self.temperature
        if not is_number(t) or t < 0 or not math.isfinite(t):
            fail("temperature", "must be a finite number >= 0 (0 = greedy).")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            fail("top_k", "must be None or an integer >= 1.")
        if self.top_p is not None and (not is_number(self.top_p) or not 0.0 < self.top_p <= 1.0):
            fail("top_p", "must be None or a number in (0, 1].")
        if not is_int(self.num_return_sequences) or self.num_return_sequences < 1:
            fail("num_return_sequences", "must be an integer >= 1.")
        if self.seed is not None and not is_int(self.seed):
            fail("seed", "must be an integer (or None for the caller's default).")
        stop = self.stop
        if stop is None:
            stop = ()
        stops = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stops, (list, tuple)) or any(not isinstance(s, str) or not s for s in stops):
            fail("stop", "must be a non-empty string or a list of them.")
        eos = self.eos_token_ids
        if eos is not None:
            if isinstance(eos, (str, bytes)) or not isinstance(eos, (list, tuple, np.ndarray)) or \
                    any(not is_int(e) or int(e) < 0 for e in eos):
                fail("eos_token_ids", "must be a list of token ids ([] = never stop early).")
            if len(eos) > MAX_EOS_IDS:
                fail("eos_token_ids", f"holds {len(eos)} ids; at most {MAX_EOS_IDS} are supported.")
        if not isinstance(self.skip_special_tokens, (bool, np.bool_)):
            fail("skip_special_tokens", "must be True or False.")
        if not is_int(self.stop_check_every) or self.stop_check_every < 1:
            fail("stop_check_every", "must be an integer >= 1 (decode steps between stop-string checks).")
        # Normalised forms (hashable, one spelling per value).
        set_ = object.__setattr__
        set_(self, "stop", tuple(stops))
        set_(self, "eos_token_ids", None if eos is None else tuple(int(e) for e in eos))
        for name in ("max_new_tokens", "top_k", "num_return_sequences", "seed", "stop_check_every"):
            if getattr(self, name) is not None:
                set_(self, name, int(getattr(self, name)))
        set_(self, "temperature", float(self.temperature))
        if self.top_p is not None:
            set_(self, "top_p", float(self.top_p))
        set_(self, "skip_special_tokens", bool(self.skip_special_tokens))

    # ------------------------------------------------------------------ building one
    @classmethod
    def of(cls, sampling: Optional["SamplingParams"], options: Mapping[str, Any], where: str = "generate()"
           ) -> "SamplingParams":
        """The one place a call's sampling keywords become a ``SamplingParams``.

        ``options`` are the keywords the caller got (any field of this class); ``sampling`` a
        ``SamplingParams`` given as ``sampling=``. Both may come together only where they agree;
        a keyword that is no field, or one that contradicts ``sampling``, is refused by name.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"{where}: unexpected keyword argument(s) {', '.join(unknown)}; the sampling keywords are "
                            f"{', '.join(sorted(names))} (or sampling=SamplingParams(...)).")
        if sampling is not None and not isinstance(sampling, cls):
            raise TypeError(f"{where}: sampling={sampling!r} must be a jaxsft.SamplingParams (or None).")
        try:
            if sampling is None:
                return cls(**options)
            for name, value in options.items():
                mine = getattr(sampling, name)
                if getattr(dataclasses.replace(sampling, **{name: value}), name) != mine:
                    raise ValueError(f"{where}: {name}={value!r} conflicts with sampling=SamplingParams(..., "
                                     f"{name}={mine!r}); give {name} in one place.")
            return sampling
        except SamplingError as err:
            raise SamplingError(str(err).replace("SamplingParams:", f"{where}:", 1)) from None

    # ------------------------------------------------------------------ what the engine reads
    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def mode(self) -> Mode:
        """The compile-time part: greedy, or sampling with its top-k value and whether top-p filters."""
        if self.greedy:
            return Mode("greedy")
        return Mode("sample", self.top_k, self.top_p is not None and self.top_p < 1.0)
