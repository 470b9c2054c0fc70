"""What is wrong with a scan file, in the user's terms, and silence from the libraries that read it.

ITK, GDCM, MetaIO and teem write their complaints straight to the process's stderr (and one corrupt MetaImage
header crashes ITK), nibabel logs its header repairs to the terminal, and every library names its own source
files in its exceptions. So a scan is read in three steps: `check_text_header` refuses a NRRD or MetaImage header
that a library would misread or crash on, with a specific message; the library then runs inside
`LibraryOutput`, which captures what it writes; and `library_problem` / `repairs` turn what it said into one line
or a warning, without paths or library names.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

from .errors import BrainDINOError

_CAPTURE = threading.RLock()
_depth = 0  # captures open (in the thread holding _CAPTURE)
_NIBABEL_LOGGER = "nibabel.global"


class LibraryOutput:
    """Captures, for the duration of a ``with`` block, what libraries write to the process's stderr (file
    descriptor 2, where C++ code writes), nibabel's header-repair log and Python warnings; ``lines`` holds it after.

    Captures are serialised (stderr is one per process); a nested one leaves its lines to the outer. Programs that
    also print from other threads keep their own output apart with `separate_python_stderr`.
    """

    def __init__(self):
        self.lines: list[str] = []

    def __enter__(self) -> LibraryOutput:
        global _depth
        _CAPTURE.acquire()
        self._outer = _depth == 0
        _depth += 1
        if not self._outer:
            return self
        self._sink = tempfile.TemporaryFile()
        self._saved_fd = None
        try:
            if sys.stderr is not None:  # None in a windowless process
                sys.stderr.flush()
            self._saved_fd = os.dup(2)
            os.dup2(self._sink.fileno(), 2)
        except (AttributeError, OSError, ValueError):  # no usable descriptor 2 (a GUI process): nothing to silence
            pass
        logger = logging.getLogger(_NIBABEL_LOGGER)
        self._logger_state = logger.handlers, logger.propagate
        self._records = _Recorder()
        logger.handlers, logger.propagate = [self._records], False
        self._warnings = warnings.catch_warnings(record=True)
        self._caught = self._warnings.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc) -> None:
        global _depth
        try:
            if self._outer:
                self._warnings.__exit__(*exc)
                logger = logging.getLogger(_NIBABEL_LOGGER)
                logger.handlers, logger.propagate = self._logger_state
                if self._saved_fd is not None:
                    os.dup2(self._saved_fd, 2)
                    os.close(self._saved_fd)
                self._sink.seek(0)
                written = self._sink.read().decode("utf-8", errors="replace")
                self._sink.close()
                self.lines = [line.strip() for line in written.splitlines() if line.strip()]
                self.lines += self._records.messages + [str(w.message) for w in self._caught]
        finally:
            _depth -= 1
            _CAPTURE.release()


class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class separate_python_stderr:  # noqa: N801 (a context manager used like a function)
    """Python's own stderr (messages, progress bars, logging) on a descriptor of its own for the ``with`` block,
    so that a `LibraryOutput` in another thread never swallows it. A no-op when stderr is not a real file."""

    def __enter__(self) -> None:
        self._saved = sys.stderr
        try:
            descriptor = os.dup(sys.stderr.fileno())
        except (AttributeError, OSError, ValueError):  # already replaced (a test's capture, a GUI)
            return
        sys.stderr.flush()
        sys.stderr = open(descriptor, "w", encoding=self._saved.encoding, errors="backslashreplace", buffering=1)

    def __exit__(self, *exc) -> None:
        if sys.stderr is not self._saved:
            sys.stderr.close()
            sys.stderr = self._saved


# ---- text headers (NRRD, MetaImage), checked before a library reads them ----

#: Bytes per voxel of MetaImage element types.
META_TYPES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4, "MET_LONG": 4,
    "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip
#: Bytes per voxel of NRRD types, by every name the format allows.
NRRD_TYPES = {
    name: size
    for size, names in (
        (1, "signed char|int8|int8_t|uchar|unsigned char|uint8|uint8_t"),
        (2, "short|short int|signed short|signed short int|int16|int16_t|ushort|unsigned short|unsigned short int"
            "|uint16|uint16_t"),
        (4, "int|signed int|int32|int32_t|uint|unsigned int|uint32|uint32_t|float"),
        (8, "longlong|long long|long long int|signed long long|signed long long int|int64|int64_t|ulonglong"
            "|unsigned long long|unsigned long long int|uint64|uint64_t|double"),
    )
    for name in names.split("|")
}  # fmt: skip
NRRD_ENCODINGS = {"raw": "raw", "txt": "text", "text": "text", "ascii": "text", "hex": "hex", "gz": "gzip",
                  "gzip": "gzip", "bz2": "bzip2", "bzip2": "bzip2"}  # fmt: skip
NRRD_FIELDS = {
    "content", "number", "type", "block size", "blocksize", "dimension", "space", "space dimension", "sizes",
    "spacings", "thicknesses", "axis mins", "axismins", "axis maxs", "axismaxs", "centers", "centerings", "labels",
    "units", "kinds", "space units", "space origin", "space directions", "measurement frame", "min", "max",
    "old min", "oldmin", "old max", "oldmax", "endian", "encoding", "line skip", "lineskip", "byte skip",
    "byteskip", "data file", "datafile", "sample units", "sampleunits",
}  # fmt: skip
#: Most dimensions a header may name (NRRD's limit; MetaImage's is lower).
MAX_DIMENSIONS = 16
_HEADER_LIMIT = 1 << 16  # a text header longer than this is not one


ShapeCheck = Callable[[tuple[int, ...]], None]


def check_text_header(path: Path, check_shape: ShapeCheck | None = None) -> None:
    """Refuse a NRRD (``.nrrd``, ``.nhdr``) or MetaImage (``.mha``, ``.mhd``) file whose header is incomplete or
    inconsistent, or whose voxel data is missing or cut short, before a library reads (or crashes on) it.

    Args:
        check_shape: called with the header's image size (fastest axis first) before the data is checked; it
            raises for sizes the caller refuses.

    Raises:
        BrainDINOError: one line naming the file and the problem.
    """
    problem = text_header_problem(path, check_shape=check_shape)
    if problem:
        raise BrainDINOError(f"{path}: {problem}")


def text_header_problem(path: Path, *, failed: bool = False, check_shape: ShapeCheck | None = None) -> str | None:
    """What is wrong with a NRRD or MetaImage header (None: nothing found). ``failed``: the library has refused
    the file, so what MetaIO sometimes tolerates (a line that is not a field) is named as the problem."""
    name = path.name.lower()
    if name.endswith((".nrrd", ".nhdr")):
        return _nrrd_problem(path, check_shape)
    if name.endswith((".mha", ".mhd")):
        return _meta_problem(path, failed, check_shape)
    return None


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(_HEADER_LIMIT)


def _fields(lines: list[str], kind: str, *, failed: bool = False) -> dict[str, str] | str:
    """``key -> value`` of header lines, or the problem. NRRD (teem) refuses a line that is not a known field and a
    field given twice; MetaIO takes a repeated field's last value and often skips a line that is not a field (named
    as the problem when ``failed``)."""
    strict = kind == "NRRD"
    fields: dict[str, str] = {}
    for line in lines:
        if not line.strip() or line.startswith("#") or (strict and ":=" in line.split(": ", 1)[0]):
            continue
        key, found, value = line.partition(": " if strict else "=")
        key = key.strip().lower() if strict else key.strip()
        if (strict or failed) and not found:
            return f"the {kind} header has a line that is not a field: '{_shorten(line)}'"
        if strict and key not in NRRD_FIELDS:
            return f"the {kind} header has an unknown field '{_shorten(key)}'"
        if strict and key in fields:
            return f"the {kind} header gives the field '{key}' twice"
        if found:
            fields[key] = value.strip()
    return fields


def _integers(text: str) -> list[int] | None:
    try:
        return [int(v) for v in text.split()]
    except ValueError:
        return None


def _numbers(text: str) -> list[float] | None:
    try:
        return [float(v) for v in text.replace(",", " ").replace("(", " ").replace(")", " ").split()]
    except ValueError:
        return None


def _shorten(text: str, limit: int = 40) -> str:
    printable = "".join(c if c.isprintable() else "?" for c in text)
    return printable if len(printable) <= limit else printable[: limit - 1] + "\u2026"


def _sizes_problem(kind: str, dimensions_text: str, sizes_text: str, sizes_field: str) -> tuple[list[int], str | None]:
    """(sizes, problem) of a header's dimension count and sizes."""
    dimensions = _integers(dimensions_text)
    if dimensions is None or len(dimensions) != 1 or not 1 <= dimensions[0] <= MAX_DIMENSIONS:
        return [], f"the {kind} header gives '{_shorten(dimensions_text)}' as the number of dimensions"
    sizes = _integers(sizes_text)
    if sizes is None:
        return [], f"the {kind} header's {sizes_field} '{_shorten(sizes_text)}' are not whole numbers"
    if len(sizes) != dimensions[0]:
        return [], f"the header names {dimensions[0]} dimensions but gives sizes for {len(sizes)}"
    if any(size <= 0 for size in sizes):
        return [], f"the header gives an invalid image size {tuple(sizes)}"
    return sizes, None


def _data_problem(
    kind: str, data_file: Path, offset: int, expected: int, encoding: str, header_says: str
) -> str | None:
    """Whether the voxel data a header describes is there: the file exists, raw data is long enough, compressed
    data is of the declared kind."""
    if not data_file.is_file():
        return f"the data file {data_file.name} that the {kind} header names does not exist"
    available = data_file.stat().st_size - offset
    if encoding == "raw" and available < expected:
        return f"the voxel data is cut short: {max(available, 0):,} of {expected:,} bytes (the file is truncated)"
    if encoding in ("gzip", "zlib", "bzip2"):
        with open(data_file, "rb") as handle:
            handle.seek(offset)
            start = handle.read(3)
        magic = {"gzip": (b"\x1f\x8b",), "zlib": (b"\x78\x01", b"\x78\x5e", b"\x78\x9c", b"\x78\xda"),
                 "bzip2": (b"BZh",)}[encoding]  # fmt: skip
        if not start.startswith(magic) and not (encoding == "gzip" and available == expected):  # zlib reads raw too
            return f"the header declares {header_says} data but the data is not {encoding}"
    return None


def _nrrd_problem(path: Path, check_shape: ShapeCheck | None) -> str | None:
    head = _read_head(path)
    if not re.match(rb"NRRD000[1-5]\r?\n", head):
        return "not a NRRD file (it does not start with the 'NRRD000N' line)"
    end = head.find(b"\n\n")
    attached = end >= 0
    header = head[: end if attached else len(head)].decode("latin-1")
    fields = _fields(header.replace("\r", "").split("\n")[1:], "NRRD")
    if isinstance(fields, str):
        return fields
    missing = [key for key in ("type", "dimension", "sizes", "encoding") if key not in fields]
    if missing:
        return f"the NRRD header has no '{missing[0]}' field"
    if fields["type"] not in NRRD_TYPES:
        return f"the NRRD header names an unknown voxel type '{_shorten(fields['type'])}'"
    encoding = NRRD_ENCODINGS.get(fields["encoding"])
    if encoding is None:
        return f"the NRRD header names an unknown encoding '{_shorten(fields['encoding'])}'"
    sizes, problem = _sizes_problem("NRRD", fields["dimension"], fields["sizes"], "sizes")
    if problem:
        return problem
    if check_shape:
        check_shape(tuple(sizes))
    if NRRD_TYPES[fields["type"]] > 1 and encoding != "text" and fields.get("endian") not in ("little", "big"):
        return "the NRRD header does not say the byte order ('endian: little' or 'endian: big')"
    data_file = fields.get("data file", fields.get("datafile"))
    if data_file is None and not attached:
        return "the NRRD header has no end (a blank line) and names no data file"
    if any(key in fields for key in ("line skip", "lineskip", "byte skip", "byteskip")) or encoding in ("text", "hex"):
        return None  # the data's start or length is not simple to tell
    if data_file is not None:
        if "%" in data_file or data_file.startswith("LIST"):
            return None
        target, offset = path.parent / data_file, 0
    else:
        target, offset = path, end + 2
    size = NRRD_TYPES[fields["type"]] * _product(sizes)
    return _data_problem("NRRD", target, offset, size, encoding, f"{fields['encoding']}-compressed")


def _product(values: list[int]) -> int:
    total = 1
    for value in values:
        total *= value
    return total


def _meta_problem(path: Path, failed: bool, check_shape: ShapeCheck | None) -> str | None:
    head = _read_head(path)
    marker = re.search(rb"^ElementDataFile\s*=\s*(.*?)\r?$", head, re.MULTILINE)
    if marker is None:
        if b"=" not in head[:200]:
            return "not a MetaImage file (no 'Key = Value' header)"
        return "the MetaImage header has no ElementDataFile field (where the voxel data is)"
    lines = head[: marker.start()].decode("latin-1").replace("\r", "").split("\n")
    fields = _fields(lines, "MetaImage", failed=failed)
    if isinstance(fields, str):
        return fields
    missing = [key for key in ("NDims", "DimSize", "ElementType") if key not in fields]
    if missing:
        meaning = {"NDims": "the number of dimensions", "DimSize": "the image size", "ElementType": "the voxel type"}
        return f"the MetaImage header has no {missing[0]} field ({meaning[missing[0]]})"
    sizes, problem = _sizes_problem("MetaImage", fields["NDims"], fields["DimSize"], "DimSize values")
    if problem:
        return problem
    if len(sizes) > 10:  # MetaIO's limit
        return f"the MetaImage header names {len(sizes)} dimensions (at most 10)"
    if check_shape:
        check_shape(tuple(sizes))
    if fields["ElementType"] not in META_TYPES:
        return f"the MetaImage header names an unknown voxel type '{_shorten(fields['ElementType'])}'"
    for key, count in (("ElementSpacing", len(sizes)), ("ElementSize", len(sizes)), ("Offset", len(sizes)),
                       ("Position", len(sizes)), ("Origin", len(sizes)), ("TransformMatrix", len(sizes) ** 2),
                       ("Rotation", len(sizes) ** 2), ("Orientation", len(sizes) ** 2)):  # fmt: skip
        if key in fields:
            values = _numbers(fields[key])
            if values is None or len(values) != count:
                return f"the MetaImage header's {key} '{_shorten(fields[key])}' is not {count} numbers"
    channels = _integers(fields.get("ElementNumberOfChannels", "1"))
    if channels is None or len(channels) != 1 or not 1 <= channels[0] <= 64:
        return f"the MetaImage header gives '{_shorten(fields['ElementNumberOfChannels'])}' channels per voxel"
    flags = {key: fields.get(key, "False") for key in ("CompressedData", "BinaryData")}
    for key, value in flags.items():
        if value not in ("True", "False", "true", "false", "1", "0"):
            return f"the MetaImage header's {key} is '{_shorten(value)}', not True or False"
    if flags["BinaryData"].lower() in ("false", "0"):
        return None  # voxels as text
    data_file = marker.group(1).decode("latin-1").strip()
    if data_file == "LOCAL":
        target, offset = path, marker.end() + 1
    elif data_file.startswith("LIST") or "%" in data_file or not data_file:
        return None
    else:
        target, offset = path.parent / data_file, 0
    compressed = flags["CompressedData"].lower() in ("true", "1")
    if not target.is_file():
        return f"the data file {target.name} that the MetaImage header names does not exist"
    for key in ("CompressedDataSize", "HeaderSize"):
        value = _integers(fields.get(key, "0"))
        if value is None or len(value) != 1 or not -1 <= value[0] <= target.stat().st_size:
            return f"the MetaImage header's {key} '{_shorten(fields[key])}' is not a size within the file"
    size = META_TYPES[fields["ElementType"]] * channels[0] * _product(sizes)
    return _data_problem("MetaImage", target, offset, size, "zlib" if compressed else "raw", "compressed")


# ---- DICOM ----


def dicom_file_problem(path: Path) -> str | None:
    """Why a file is not readable DICOM, from its first bytes: no 'DICM' marker after the 128-byte preamble and
    no data element where a preamble-less file starts one."""
    with open(path, "rb") as handle:
        start = handle.read(132)
    if len(start) == 132 and start[128:] == b"DICM":
        return None
    if len(start) >= 8 and start[:2] in (b"\x02\x00", b"\x08\x00"):  # group 0002 or 0008: DICOM without a preamble
        return None
    return "not a readable DICOM file (no DICM marker after the 128-byte preamble)"


# ---- what the libraries said, in the user's terms ----

#: Library messages that mean the read failed even when no exception said so.
FAILURE_SIGNS = ("Uncompress failed", "data not read completely")
_NOISE = re.compile(
    r"^(Exception thrown in SimpleITK|WARNING: In |Reason: Success|\[nrrd\] (nrrdLoad|nrrdRead|_nrrdRead): trouble"
    r"|\[nrrd\] _nrrdFormatNRRD_read:?$|MetaObject: Read: MET_Read Failed|MetaImage: M_Read: Error parsing file"
    r"|MetaImage: Read: Cannot parse file|.*Error reading .*:$)"
)
_PREFIX = re.compile(
    r"^((?:ITK ERROR|itk::ERROR|sitk::ERROR|itk::ExceptionObject)[:\s]*(\w+\(0x[0-9a-f]+\):)?\s*"
    r"|\[\w+\] \w+: |MetaImage: \w+: |\w+ \(0x[0-9a-f]+\): )"
)
_TRANSLATIONS = (
    (re.compile(r"Expected (\d+) bytes, got (\d+) bytes"), "the voxel data is cut short: {1} of {0} bytes"),
    (re.compile(r"ideal = (\d+) : actual = (\d+)"), "the voxel data is cut short: {1} of {0} bytes"),
    (re.compile(r"fread got only (\d+) (\d+)-sized things, not (\d+)"),
     "the voxel data is cut short: {0} of {2} values"),
    (re.compile(r"Compressed file ended before the end-of-stream marker"), "the gzip stream is cut short"),
    (re.compile(r"(Error -\d+ while decompressing|invalid (distance|code|block|stored)|incorrect header check)"),
     "the compressed data is corrupt"),
    (re.compile(r"CRC check failed|incorrect data check"), "the compressed data is corrupt (checksum mismatch)"),
    (re.compile(r"Uncompress failed"), "the compressed voxel data is corrupt"),
    (re.compile(r"Cannot work out file type|Not a gzipped file|is not a gzip file"),
     "not a valid header for its file type"),
    (re.compile(r"already set field (\w[\w ]*)"), "the header gives the field '{0}' twice"),
    (re.compile(r"Unknown PixelType"), "the header names a voxel type that cannot be read"),
    (re.compile(r"expected (\d+) bytes but received (\d+)"), "the voxel data is cut short: {1} of {0} bytes"),
    (re.compile(r"vox offset (-?\d+) too low"), "the header's data offset (vox_offset {0}) lies inside the header"),
    (re.compile(r"data code (-?\d+) not (supported|recognized)"), "the header names an unknown data type code {0}"),
    (re.compile(r"gzFile|data read error"), "the gzip-compressed data is corrupt or cut short"),
    (re.compile(r"std::bad_alloc"), "a size in the header is far larger than the file (corrupt header)"),
    (re.compile(r"invalid logic behavior occurred\s*(\w+)"), "a file gives an invalid {0} value"),
    (re.compile(r"Unable to determine ImageIO reader"), "not a file type the image reader recognises"),
    (re.compile(r"Zero-valued spacing"), "the header gives a voxel spacing of zero"),
    (re.compile(r"trouble parsing (\w[\w ]*?) info"), "the header's '{0}' field cannot be parsed"),
    (re.compile(r"couldn't parse (origin|space)"), "the header's '{0}' field cannot be parsed"),
    (re.compile(r"trouble getting space vector"), "the header's 'space directions' field cannot be parsed"),
    (re.compile(r"ScalarType found\s*:\s*UNKNOWN"), "the DICOM pixel format (bits allocated, pixel representation) "
     "is not supported"),
)  # fmt: skip
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s\\/:\"'()]+){2,}[\\/]?")
_POINTER = re.compile(r"\s*\(0x[0-9a-f]+\)")


def library_problem(path: str | Path, said: str | BaseException, lines: list[str] = ()) -> str:
    """The problem a library reported (its exception text, plus what it wrote while reading) as a short phrase:
    translated where it is a known one, otherwise its most specific line, without paths or pointers."""
    texts = [*str(said).splitlines(), *lines]
    for pattern, phrase in _TRANSLATIONS:
        for text in texts:
            match = pattern.search(text)
            if match:
                return phrase.format(*match.groups())
    names = (str(path), Path(path).name)
    kept = []
    for text in texts:
        text = _PREFIX.sub("", text.strip()).strip()
        if not text or _NOISE.match(text):
            continue
        for name in names:
            text = text.replace(f'"{name}"', "the file").replace(name, "the file")
        text = _POINTER.sub("", _PATH.sub("", text)).strip(" :;,.")
        if text and text not in kept:
            kept.append(text)
    return _shorten("; ".join(kept[-2:]), 200) if kept else "the library gave no reason"


def failed_silently(lines: list[str]) -> bool:
    """Whether a library's output says a read failed although it returned an image."""
    return any(sign in line for line in lines for sign in FAILURE_SIGNS)


_REPAIRS = (
    (re.compile(r"pixdim\[1,2,3\] should be positive"), "pixel spacing made positive"),
    (re.compile(r"pixdim\[1,2,3\] should be non-zero"), "zero pixel spacing set to 1 mm"),
    (re.compile(r"sizeof_hdr should be"), "header size field corrected"),
    (re.compile(r"bitpix does not match datatype"), "bits per voxel made to match the data type"),
    (re.compile(r"qfac\) should be 1"), "orientation sign (qfac) set to 1"),
    (re.compile(r"(qform|sform)_code (\S+) not valid"), "invalid {0} code {1} ignored"),
    (re.compile(r"vox offset .* not divisible by 16"), None),  # harmless for every reader
)
_UNEVEN = re.compile(r"Non uniform sampling or missing slices detected,\s*maximum nonuniformity:\s*([\d.e+-]+)")


def repairs(lines: list[str]) -> list[str]:
    """Warnings for what a library fixed or noticed while reading a scan that it did read."""
    fixed, noticed = [], []
    for line in lines:
        if line.startswith("WARNING: In "):
            continue
        match = next(((m, phrase) for pattern, phrase in _REPAIRS if (m := pattern.search(line))), None)
        if match:
            if match[1]:
                fixed.append(match[1].format(*match[0].groups()))
        elif uneven := _UNEVEN.search(line):
            noticed.append(
                "the slices are unevenly spaced or one is missing (positions deviate from even spacing by up to "
                f"{float(uneven[1]):.3g} mm); the volume is read evenly spaced, so distances across slices are "
                "approximate"
            )
        else:
            noticed.append(f"the reader reported: {library_problem('', line)}")
    repaired = [f"header fields were repaired: {', '.join(dict.fromkeys(fixed))}"] if fixed else []
    return repaired + list(dict.fromkeys(noticed))
