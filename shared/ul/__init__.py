"""The DICOM upper layer on asyncio: ``codec`` (bytes only, no I/O) and ``connection`` (the drivers).

Split so the codec can be checked byte for byte against pynetdicom's encoders
and the drivers against real peers on real sockets. Callers keep using
``from shared import ul`` and ``ul.<name>``: both modules' names are here.
"""

from shared.ul import codec, connection
from shared.ul.codec import *  # noqa: F403
from shared.ul.connection import *  # noqa: F403

__all__ = [*codec.__all__, *connection.__all__]
