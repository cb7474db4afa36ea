"""Progress bars (tqdm) for long runs, in terminals and notebooks alike."""
import contextlib


class _Bar:
    def __init__(self, bar):
        self._bar = bar

    def callback(self, done, total):
        """For the core: called between chunks with the rows done so far."""
        if self._bar is None:
            return
        if self._bar.total != total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def update(self, n):
        if self._bar is not None:
            self._bar.update(n)


@contextlib.contextmanager
def progress_bar(progress, description, unit, total=None):
    """progress: True (always show), False (never) or None (show once the work has
    taken more than a second, so quick calls stay quiet)."""
    if progress is False:
        yield _Bar(None)
        return
    try:
        import ipywidgets  # noqa: F401  (tqdm's notebook bar needs it)
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm import tqdm

    bar = tqdm(total=total, desc=description, unit=unit, delay=0 if progress else 1.0, leave=False)
    try:
        yield _Bar(bar)
    finally:
        bar.close()
