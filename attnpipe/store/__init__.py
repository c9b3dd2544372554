"""The attention file formats: spec and records (`format`), HDF5 writer (`writer`), reader
(`reader`), JSON (`json_file`), chunk codec (`codec`), checks (`validate`), shard merging
(`merge`), atomic writes (`atomic`) and layer/head selection (`selection`).

The spec is attnpipe.store.format's docstring (docs/FORMAT.md says the same for users). This
package re-exports the public API, so `from attnpipe import store; store.open_attention(path)`.
"""

from attnpipe.store.codec import chunk_shape, decode, deflate_bytes, encode_chunk, read_whole, to_storage
from attnpipe.store.format import (
    CHUNK_TARGET_BYTES,
    COMPRESSIONS,
    DECODER_FIELDS,
    DEFAULT_GZIP_LEVEL,
    DEFAULT_GZIP_LEVELS,
    DIMS,
    FORMAT_NAME,
    H5_SCHEMA_VERSION,
    MAX_GZIP_LEVEL,
    OUTPUT_SUFFIXES,
    READABLE_VERSIONS,
    ROW_SELECTIONS,
    ROW_SUM_TOL,
    SCHEMA_VERSION,
    STORAGE_DTYPES,
    UINT8_ROW_SLACK,
    UINT8_SCALE,
    Compression,
    ImageInfo,
    InputKind,
    Provenance,
    RowSelection,
    Storage,
    StorageDtype,
    TargetAttention,
    TextAttention,
    query_positions,
)
from attnpipe.store.json_file import JSONWriter, write_json
from attnpipe.store.memory import MemoryStore
from attnpipe.store.reader import (
    METRIC_DATASETS,
    TEXT_ATTRS,
    TEXT_DATASETS,
    AttentionFile,
    metrics_labels,
    metrics_table,
    open_attention,
)
from attnpipe.store.validate import check_rows, check_text
from attnpipe.store.writer import (
    METADATA_CACHE_BYTES,
    WRITE_MARGIN_BYTES,
    H5Writer,
    check_output_path,
    h5_writer,
    open_writer,
    write_metrics_group,
)

__all__ = [
    "CHUNK_TARGET_BYTES", "COMPRESSIONS", "DECODER_FIELDS", "DEFAULT_GZIP_LEVEL", "DEFAULT_GZIP_LEVELS",
    "DIMS", "FORMAT_NAME", "MAX_GZIP_LEVEL", "METADATA_CACHE_BYTES", "METRIC_DATASETS", "OUTPUT_SUFFIXES",
    "H5_SCHEMA_VERSION", "READABLE_VERSIONS", "ROW_SELECTIONS", "ROW_SUM_TOL", "SCHEMA_VERSION", "STORAGE_DTYPES", "TEXT_ATTRS",
    "TEXT_DATASETS", "UINT8_ROW_SLACK", "UINT8_SCALE", "WRITE_MARGIN_BYTES",
    "AttentionFile", "Compression", "H5Writer", "ImageInfo", "InputKind", "JSONWriter", "MemoryStore", "Provenance",
    "RowSelection", "Storage", "StorageDtype", "TargetAttention", "TextAttention",
    "check_output_path", "check_rows", "h5_writer", "check_text", "chunk_shape", "decode", "deflate_bytes",
    "encode_chunk", "metrics_labels", "metrics_table", "open_attention", "open_writer", "query_positions", "read_whole",
    "to_storage", "write_json", "write_metrics_group",
]
