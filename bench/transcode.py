"""HTJ2K decode throughput: gateway.codecs.decode_frame vs OpenJPH's ojph_expand.

Makes N synthetic 512x512 16-bit CT-like frames (body outline, organs, bone,
smooth gradients and noise), encodes them as HTJ2K lossless .j2c codestreams
in a temp dir, then times, in the same run:

  (a) decode_frame() on every codestream, in-process (imagecodecs/OpenJPH
      behind pydicom's decoder pipeline, including its validation);
  (b) /usr/bin/ojph_expand -i f.j2c -o f.raw, one process per frame;
  (c) for reference, imagecodecs.htj2k_decode alone, to show what pydicom's
      pipeline around it costs.

(b) pays process start-up and writes the output file for every frame, so it
is also reported with start-up removed: the mean wall time of ojph_expand on
a 1x1 codestream (start-up + trivial decode) is subtracted per frame.

Run: python bench/transcode.py [--frames N] [--repeat R]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imagecodecs
import numpy as np

from gateway.codecs import PixelDescription, decode_frame, encode_frame
from gateway.codecs.syntaxes import HTJ2K_LOSSLESS

OJPH_EXPAND = "/usr/bin/ojph_expand"
SIZE = 512
DESC = PixelDescription(
    rows=SIZE,
    columns=SIZE,
    samples_per_pixel=1,
    bits_allocated=16,
    bits_stored=16,
    pixel_representation=0,
    photometric_interpretation="MONOCHROME2",
)


def ct_like_frame(index: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """A CT slice in stored units (HU + 1024): structure varies along the stack."""
    z = index / max(count - 1, 1)
    yy, xx = np.mgrid[-1.0 : 1.0 : SIZE * 1j, -1.0 : 1.0 : SIZE * 1j]
    hu = np.full((SIZE, SIZE), -1000.0)  # air
    body = (xx / (0.85 - 0.1 * z)) ** 2 + (yy / (0.65 - 0.05 * z)) ** 2 < 1.0
    hu[body] = 40.0 + 30.0 * yy[body]  # soft tissue with a gentle gradient
    for side in (-1.0, 1.0):  # lungs shrink towards the abdomen
        lung = ((xx - side * 0.38) / 0.28) ** 2 + (yy / (0.42 * (1.0 - 0.6 * z))) ** 2 < 1.0
        hu[lung] = -850.0 + 60.0 * np.cos(6.0 * xx[lung])
    organ = ((xx - 0.1) / 0.3) ** 2 + ((yy - 0.15) / (0.1 + 0.2 * z)) ** 2 < 1.0
    hu[organ] = 60.0 + 15.0 * np.sin(9.0 * yy[organ])
    spine = (xx / 0.09) ** 2 + ((yy - 0.5) / 0.09) ** 2 < 1.0
    hu[spine] = 700.0 + 300.0 * np.exp(-((xx[spine] ** 2 + (yy[spine] - 0.5) ** 2) / 0.002))
    hu += rng.normal(0.0, 12.0, hu.shape)  # quantum noise, air included
    return np.clip(np.rint(hu + 1024.0), 0, 4095).astype(np.uint16)


def time_ours(codestreams: list[bytes], frames: list[np.ndarray], repeat: int) -> float:
    """Best-of-`repeat` seconds to decode every codestream; checks the pixels."""
    for data, expected in zip(codestreams, frames):
        if not np.array_equal(decode_frame(data, HTJ2K_LOSSLESS, DESC), expected):
            sys.exit("decode_frame output differs from the source frame")
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for data in codestreams:
            decode_frame(data, HTJ2K_LOSSLESS, DESC)
        best = min(best, time.perf_counter() - start)
    return best


def time_raw_imagecodecs(codestreams: list[bytes], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for data in codestreams:
            imagecodecs.htj2k_decode(data)
        best = min(best, time.perf_counter() - start)
    return best


def run_expand(source: Path, target: Path) -> None:
    subprocess.run(
        [OJPH_EXPAND, "-i", str(source), "-o", str(target)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def time_ojph(paths: list[Path], frames: list[np.ndarray], repeat: int) -> float:
    """Best-of-`repeat` seconds for one ojph_expand process per frame."""
    run_expand(paths[0], paths[0].with_suffix(".raw"))
    raw = np.fromfile(paths[0].with_suffix(".raw"), dtype="<u2").reshape(SIZE, SIZE)
    if not np.array_equal(raw, frames[0]):
        sys.exit("ojph_expand output differs from the source frame")
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for path in paths:
            run_expand(path, path.with_suffix(".raw"))
        best = min(best, time.perf_counter() - start)
    return best


def startup_seconds(workdir: Path, runs: int, repeat: int = 1) -> float:
    """Mean wall time of ojph_expand on a 1x1 frame: process start-up cost. Best of
    ``repeat`` batches of ``runs``, as `time_ojph` is: on a shared machine a mean taken
    once can exceed a whole decode's best and leave nothing when subtracted."""
    tiny = workdir / "tiny.j2c"
    tiny_desc = PixelDescription(1, 1, 1, 16, 16, 0, "MONOCHROME2")
    tiny.write_bytes(encode_frame(np.zeros((1, 1), np.uint16), HTJ2K_LOSSLESS, tiny_desc))
    run_expand(tiny, workdir / "tiny.raw")  # warm the page cache
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(runs):
            run_expand(tiny, workdir / "tiny.raw")
        best = min(best, (time.perf_counter() - start) / runs)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3, help="best of R timed passes")
    args = parser.parse_args()
    if not shutil.which(OJPH_EXPAND):
        sys.exit(f"{OJPH_EXPAND} not found (Debian package openjph-tools)")

    rng = np.random.default_rng(20240601)
    frames = [ct_like_frame(i, args.frames, rng) for i in range(args.frames)]
    codestreams = [encode_frame(frame, HTJ2K_LOSSLESS, DESC) for frame in frames]
    ratio = frames[0].nbytes * len(frames) / sum(len(c) for c in codestreams)

    with tempfile.TemporaryDirectory(prefix="htj2k-bench-") as tmp:
        workdir = Path(tmp)
        paths = []
        for index, data in enumerate(codestreams):
            path = workdir / f"frame{index:04d}.j2c"
            path.write_bytes(data)
            paths.append(path)
        ours = time_ours(codestreams, frames, args.repeat)
        raw = time_raw_imagecodecs(codestreams, args.repeat)
        ojph = time_ojph(paths, frames, args.repeat)
        startup = startup_seconds(workdir, runs=max(20, args.frames), repeat=args.repeat)

    n = len(frames)
    ojph_net = max(ojph - startup * n, 1e-9)
    rows = [
        ("ours: decode_frame (in-process)", ours),
        ("ojph_expand, one process per frame", ojph),
        ("ojph_expand minus 1x1 start-up", ojph_net),
        ("(ref) imagecodecs.htj2k_decode alone", raw),
    ]
    print(
        f"{n} frames {SIZE}x{SIZE} uint16 CT-like, HTJ2K lossless, "
        f"compression {ratio:.2f}:1, best of {args.repeat} passes"
    )
    print(f"ojph_expand start-up (1x1 frame): {startup * 1000:.2f} ms per process")
    print()
    print(f"{'decoder':<38}{'total s':>9}{'ms/frame':>10}{'frames/s':>10}")
    for label, seconds in rows:
        print(f"{label:<38}{seconds:>9.3f}{seconds / n * 1000:>10.2f}{n / seconds:>10.1f}")
    print()
    print(f"ratio ours/ojph_expand (frames/s, whole process):   {ojph / ours:.2f}x")
    print(f"ratio ours/ojph_expand (frames/s, start-up removed): {ojph_net / ours:.2f}x")
    print("ojph_expand times include writing each .raw output file.")
    print(
        f"ours decodes with imagecodecs {imagecodecs.__version__} ({imagecodecs.htj2k_version()})."
    )


if __name__ == "__main__":
    main()
