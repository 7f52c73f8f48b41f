"""The progress bar long calls show (a tqdm byte counter)."""

from __future__ import annotations


class ProgressBar:
    """A tqdm byte counter created on the first report, so a call that fails while planning prints
    nothing; hidden when stderr is not a terminal. Called by the Rust core with (name, bytes); the
    first call, name "", carries the total."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar = None

    def __call__(self, name: str, nbytes: int) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=0,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=self.desc,
                leave=False,
                disable=None,
            )
        if name == "":
            self.bar.total = nbytes
            self.bar.refresh()
        else:
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_with_bar(desc: str, progress: bool, call):
    """`call(callback)` with a progress bar (or none), closing the bar whatever happens."""
    bar = ProgressBar(desc) if progress else None
    try:
        return call(bar)
    finally:
        if bar is not None:
            bar.close()
