"""A progress bar for long commands: tqdm when installed, one line per step otherwise."""
from __future__ import annotations

import sys
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int, desc: str, label: Callable[[T], str] = str
             ) -> Iterator[T]:
    """Yields `items`, showing progress and `label(item)` on stderr (never on stdout, which
    carries the tables)."""
    try:
        from tqdm import tqdm
    except ImportError:
        for index, item in enumerate(items, 1):
            print(f"{desc} [{index}/{total}] {label(item)}", file=sys.stderr, flush=True)
            yield item
        return
    with tqdm(items, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True) as bar:
        for item in bar:
            bar.set_postfix_str(label(item))
            yield item
