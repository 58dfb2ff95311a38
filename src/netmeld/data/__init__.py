"""What users have, as inputs: :func:`open_data` streams it batch by batch (every verb runs
over a :class:`Stream`); :func:`load_data` reads all of it into memory (:class:`Data`)."""

from netmeld.data.reading import (
    IMAGE_SUFFIXES,
    Data,
    check_finite,
    image_files,
    name_files,
    read_image,
)
from netmeld.data.stream import Batch, Stream, default_workers, load_data, open_data

__all__ = [
    "IMAGE_SUFFIXES",
    "Batch",
    "Data",
    "Stream",
    "check_finite",
    "default_workers",
    "image_files",
    "load_data",
    "name_files",
    "open_data",
    "read_image",
]
