"""Where a backbone call goes: computed at once, or handed to the pack of the calling thread.

`fastprompt.pack` runs several runs' objectives in threads of their own and merges their backbone
calls; the backbone's entry points carry `@gathered`, which asks `current()` whether the calling
thread belongs to a pack. Outside a pack (every solo call, and the pack's own merged call) a
decorated call is an ordinary call.
"""
from __future__ import annotations

import functools
import threading

_local = threading.local()


def current():
    """The pack whose run thread this is, or None (every solo call, and the pack's own merged calls)."""
    return getattr(_local, "pack", None)


def gathered(fn):
    """Backbone entry point: computed at once, or, in a run thread of a pack, merged by the pack."""
    @functools.wraps(fn)
    def call(self, *args, **kwargs):
        pack = current()
        if pack is None:
            return fn(self, *args, **kwargs)
        return pack.submit(fn, self, args, kwargs)
    return call


