"""The positions an evaluation splices the SAE into: by default those it was trained on.

An SAE trained with ``seqpos_slice: [1, null]`` never saw position 0 (often the BOS token,
whose activations are far larger); splicing it there too reports a far worse CE loss than the
SAE gives where it is used. So ``evaluate_sae`` and ``sae-e2e eval`` read the positions from
the SAE's metadata (SAELens' ``seqpos_slice`` and ``exclude_special_tokens``; this package's
``e2e_objective.excluded_token_ids``, the ids resolved when it trained) unless told otherwise,
and accept them in the config's forms: ``seqpos_slice=(1, None)``, ``exclude_special_tokens=
True`` (the tokenizer's special ids) or a list of ids. Anything else is refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sae_e2e_plugin.core.positions import PositionFilter


def eval_positions(
    sae: Any,
    model: Any,
    positions: PositionFilter | Sequence[int | None] | None = None,
    seqpos_slice: Sequence[int | None] | None = None,
    exclude_special_tokens: bool | Sequence[int] | None = None,
) -> PositionFilter:
    """The ``PositionFilter`` an evaluation of ``sae`` (or of several, ``{name: SAE}``) uses.

    ``positions`` (a ``PositionFilter``, or a ``seqpos_slice`` tuple) wins; otherwise
    ``seqpos_slice`` and ``exclude_special_tokens``, each defaulting to the SAE's metadata
    (every position, no exclusions, where the metadata records none). Several SAEs spliced in
    together need one set: SAEs whose metadata records different ones are refused."""
    if isinstance(sae, Mapping):
        found = {
            name: eval_positions(one, model, positions, seqpos_slice, exclude_special_tokens)
            for name, one in sae.items()
        }
        if len(set(found.values())) > 1:
            raise ValueError(
                f"the SAEs were trained on different positions ({found}); spliced in together "
                "they need one set. Choose it with seqpos_slice (sae-e2e eval --seqpos_slice)."
            )
        return next(iter(found.values()))
    if isinstance(positions, PositionFilter):
        if seqpos_slice is not None or exclude_special_tokens is not None:
            raise ValueError(
                "positions is a PositionFilter and seqpos_slice or exclude_special_tokens is "
                "set too; give one or the other."
            )
        return positions
    if positions is not None:
        if seqpos_slice is not None:
            raise ValueError("positions and seqpos_slice are both set; give seqpos_slice only.")
        seqpos_slice = positions
    metadata = getattr(getattr(sae, "cfg", None), "metadata", None)
    if seqpos_slice is None:
        seqpos_slice = _recorded(metadata, "seqpos_slice") or (None,)
    excluded = _excluded_ids(metadata, model, exclude_special_tokens)
    return PositionFilter(seqpos_slice=check_seqpos_slice(seqpos_slice), excluded_ids=excluded)


def check_seqpos_slice(value: Any, name: str = "seqpos_slice") -> tuple[int | None, ...]:
    """``value`` as a ``slice(*value)`` argument tuple: 1 to 3 ints or None, step not 0."""
    parts = tuple(value) if isinstance(value, (list, tuple)) else None
    if (
        parts is None
        or not 1 <= len(parts) <= 3
        or not all(p is None or (isinstance(p, int) and not isinstance(p, bool)) for p in parts)
        or (len(parts) == 3 and parts[2] is not None and parts[2] <= 0)
    ):
        raise ValueError(
            f"{name}={value!r} is not a slice of positions; give 1 to 3 ints or None as a "
            f"tuple or list, as for slice(...), e.g. {name}=(1, None) to leave position 0 out "
            "(step, if given, >= 1)."
        )
    return parts


def _excluded_ids(
    metadata: Any, model: Any, exclude: bool | Sequence[int] | None
) -> tuple[int, ...]:
    if exclude is None:
        e2e = _recorded(metadata, "e2e_objective")
        recorded = e2e.get("excluded_token_ids") if isinstance(e2e, dict) else None
        if recorded is not None:
            return _ids(recorded, "the SAE's metadata e2e_objective.excluded_token_ids")
        exclude = _recorded(metadata, "exclude_special_tokens") or False
    if exclude is True:
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                "exclude_special_tokens=True needs the model's tokenizer to find its special "
                "tokens, and the model has none; give the ids as a list."
            )
        return tuple(sorted({int(i) for i in tokenizer.all_special_ids}))
    if exclude is False:
        return ()
    return _ids(exclude, "exclude_special_tokens")


def _ids(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name}={value!r} is not a bool or a list of token ids.")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise ValueError(f"{name}={list(value)!r}: token ids are ints >= 0.")
    return tuple(int(i) for i in value)


def _recorded(metadata: Any, key: str) -> Any:
    if metadata is None:
        return None
    getter = getattr(metadata, "get", None)
    return getter(key) if callable(getter) else getattr(metadata, key, None)
