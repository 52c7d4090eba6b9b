"""A sweep's arguments checked before any work: sizes, orders, linkages, seeds, methods."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..errors import FlexMergeError

ORDERS = ("greedy", "left-right", "right-left", "random")
LINKAGES = ("min", "max", "avg")
CHANNEL_MERGING = "channel_merging"


def parse_sizes(sizes: str | float | Sequence[float | str]) -> list[float | str]:
    """``"1,1.5,2"`` or ``[1, 1.5, 2]`` -> ``[1.0, 1.5, 2.0]`` (order kept, duplicates dropped);
    byte sizes (``"40MB"``) stay strings."""
    from ..plan import parse_size

    items = [s for s in str(sizes).split(",")] if isinstance(sizes, str) else \
        ([sizes] if isinstance(sizes, (int, float)) else list(sizes))
    out: list[float | str] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        units, _nbytes = parse_size(item.strip() if isinstance(item, str) else item)
        value: float | str = float(units) if units is not None else str(item).strip()
        if value not in out:
            out.append(value)
    if not out:
        raise FlexMergeError("no sizes given; pass e.g. --sizes 1,1.5,2,4")
    return out


def parse_list(text: str | Sequence[str] | None, allowed: Sequence[str], what: str) -> list[str]:
    if text is None:
        return []
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else [str(s).strip() for s in text]
    items = [s for s in items if s]
    for s in items:
        if s not in allowed:
            raise FlexMergeError(f"unknown {what} '{s}'; use {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def _parse_seeds(seeds: Sequence[int] | str) -> list[int]:
    """Seeds of the random order, each an integer in the config's seed range."""
    from ..config import SEED_LIMIT

    items = [s.strip() for s in seeds.split(",") if s.strip()] if isinstance(seeds, str) else list(seeds)
    out = []
    for s in items:
        try:
            if isinstance(s, bool) or (isinstance(s, float) and not s.is_integer()):
                raise ValueError
            value = int(s)
        except (TypeError, ValueError, OverflowError):
            raise FlexMergeError(f"seed {s!r} is not an integer; give seeds such as --seeds 0,1,2") from None
        if not 0 <= value < SEED_LIMIT:
            raise FlexMergeError(f"seed {value} is outside 0-{SEED_LIMIT - 1}; give seeds such as --seeds 0,1,2")
        out.append(value)
    return out


def _check_methods(specs: Sequence[Any], seed: int) -> None:
    """Build every method once (cheap, reads no tensor) so that an unknown name or a bad parameter
    is reported before the first evaluation."""
    from ..methods import MergeMethod, make_method

    for spec in specs:
        if isinstance(spec, MergeMethod) or _method_name(spec) == CHANNEL_MERGING:
            continue
        make_method(spec, seed=seed)


def _method_name(spec: Any) -> str:
    from ..methods import MergeMethod

    if isinstance(spec, MergeMethod):
        return spec.name
    if isinstance(spec, Mapping):
        name = spec.get("name")
        if not isinstance(name, str):
            raise FlexMergeError("a method given as a mapping needs a 'name' key, e.g. {name: ties, k: 0.2}")
        return name
    if isinstance(spec, str):
        return spec
    raise FlexMergeError(f"a method must be a name, a mapping or a MergeMethod, got {type(spec).__name__}")
