"""The package's one progress bar: tqdm.auto, redrawn at most every REDRAW_SECONDS.

In a Jupyter kernel every redraw is a widget message on the output channel, which nbval reads only
after a cell's reply (nbval/plugin.py); ZeroMQ drops messages past its socket's high-water mark (default
1000), and a dropped message at the end leaves nbval "waiting for output". tqdm's default 0.1 s did that in
notebook 03's two-transcoder cell under make test's one-thread kernel variant; at 2 s a 20-minute cell
redraws each bar at most 600 times.
"""

from __future__ import annotations

from tqdm.auto import tqdm

REDRAW_SECONDS = 2.0


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """tqdm.auto with the package's redraw interval; keyword arguments as tqdm's."""
    return tqdm(iterable, mininterval=REDRAW_SECONDS, **kwargs)
