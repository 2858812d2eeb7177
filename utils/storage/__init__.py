"""Where sessions, identities and job files are kept, behind the ``Storage`` contract (utils/contracts.py):

    utils.storage.local.LocalStorage   the data folder (TWIN_DATA_DIR; the default)
    utils.storage.s3.S3Storage         an S3-compatible bucket (TWIN_STORAGE_URL=s3://bucket/prefix), with
                                       utils.storage.bucket (boto3) and utils.storage.cache (the bounded
                                       local cache of what a GPU worker reads)

utils/service/wiring.py picks one. The names every room uses (ids, output names, atomic writes, the
encodings) are re-exported here; the layout is in utils/storage/names.py. Importing this package imports
neither boto3 nor the S3 backend.
"""
from utils.storage.faces import SessionFaces
from utils.storage.files import (FULL_ERRNOS, StoredFile, atomic_save_png, atomic_write_bytes, atomic_write_json,
                                 full_error, is_disk_full, png_bytes, thumbnail_bytes)
from utils.storage.local import LocalStorage
from utils.storage.names import (ID_BYTES, ID_RE, OUTPUT_NAME_RE, TOKEN_RE, hash_secret, is_output_name,
                                 is_valid_id, new_id, output_name, raw_output_name, safe_extension, thumbnail_name)

Storage = LocalStorage   # the name the folder implementation had before the S3 backend

__all__ = ["FULL_ERRNOS", "ID_BYTES", "ID_RE", "OUTPUT_NAME_RE", "TOKEN_RE", "LocalStorage", "SessionFaces",
           "Storage", "StoredFile", "atomic_save_png", "atomic_write_bytes", "atomic_write_json", "full_error",
           "hash_secret", "is_disk_full", "is_output_name", "is_valid_id", "new_id", "output_name", "png_bytes",
           "raw_output_name", "safe_extension", "thumbnail_bytes", "thumbnail_name"]
