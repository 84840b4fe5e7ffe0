"""Exception raised by the codec layer."""


class TranscodeError(Exception):
    """Pixel data cannot be converted as asked.

    One type for every codec failure (unsupported syntax, pixel format the
    target cannot carry, corrupt codestream, lossy conversion not allowed) so
    that the C-MOVE/C-GET SCP and the DICOMweb facade can map it to a single
    failure status instead of leaking pydicom/imagecodecs internals.
    Argument misuse (wrong shapes, bad types) raises ValueError/TypeError.
    """
