"""The kernel store: a persistent, content-addressed kernel library shared between processes.

Rows (metadata, lineage, validation reports, usage) live in SQLite in WAL mode; artifacts live
in content-addressed files written atomically and verified on every read, and every row served
is checked against the :class:`KernelRequest` it was stored for. See :class:`KernelStore` and
docs/store.md ("Trust model").
"""

from ._bundle import BundleEntry as BundleEntry
from ._bundle import BundleLimits as BundleLimits
from ._cli import add_store_parser as add_store_parser
from ._cli import run_store_command as run_store_command
from ._keys import STORE_ENV_VAR as STORE_ENV_VAR
from ._keys import KernelRequest as KernelRequest
from ._keys import default_store_path as default_store_path
from ._keys import kernel_key as kernel_key
from ._lru import ByteLRU as ByteLRU
from ._lru import LRUStats as LRUStats
from ._queries import BlueprintRecord as BlueprintRecord
from ._records import GcReport as GcReport
from ._records import KernelRecord as KernelRecord
from ._records import KernelStatus as KernelStatus
from ._records import StoreStats as StoreStats
from ._records import VerifyReport as VerifyReport
from ._schema import SCHEMA_VERSION as SCHEMA_VERSION
from ._store import KernelStore as KernelStore

__all__ = (
    "SCHEMA_VERSION",
    "STORE_ENV_VAR",
    "BlueprintRecord",
    "BundleEntry",
    "BundleLimits",
    "ByteLRU",
    "GcReport",
    "KernelRecord",
    "KernelRequest",
    "KernelStatus",
    "KernelStore",
    "LRUStats",
    "StoreStats",
    "VerifyReport",
    "add_store_parser",
    "default_store_path",
    "kernel_key",
    "run_store_command",
)
