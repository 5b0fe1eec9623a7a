"""
A longer byte-level fuzz of `evl_hf.decode_video` than the test suite's bounded one: mutates valid seed clips
(bit flips, truncation, splices, zeroed blocks) for `--seconds`, each decode in a child process so that a crash or a
hang in FFmpeg is caught and the input kept in `--out` for reproduction.

    python tools/fuzz_decoding.py --seconds 600 --out fuzz_findings [--backend torchcodec|pyav|auto]
"""

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

from evl_hf import EVLVideoDecodingError, decode_video


def seeds() -> list[bytes]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import tempfile

    from helpers import index_coded_frames, write_clip

    directory = Path(tempfile.mkdtemp())
    return [
        write_clip(directory / "a.mp4", index_coded_frames(40), gop=5).read_bytes(),
        write_clip(directory / "b.mp4", index_coded_frames(12, 96, 128), gop=4).read_bytes(),
    ]


def mutate(blob: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(blob)
    for _ in range(rng.integers(1, 4)):
        kind = rng.integers(4)
        position = int(rng.integers(0, max(len(data), 1)))
        if kind == 0:
            for p in rng.integers(0, len(data), rng.integers(1, 128)):
                data[p] ^= int(rng.integers(1, 256))
        elif kind == 1:
            data = data[:position]
        elif kind == 2:
            data[position:position] = rng.bytes(int(rng.integers(1, 2048)))
        else:
            length = int(rng.integers(1, 8192))
            data[position : position + length] = bytes(len(data[position : position + length]))
        if not data:
            break
    return bytes(data)


def decode_one(blob: bytes, backend: str, queue) -> None:
    try:
        frames, _ = decode_video(blob, lambda metadata: [0, 3, 7, 50], timeout=30, backend=backend)
        assert frames.dtype == np.uint8 and frames.shape[0] == 4
        queue.put("ok")
    except EVLVideoDecodingError:
        queue.put("error")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--out", default="fuzz_findings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto", choices=["auto", "torchcodec", "pyav"])
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    corpus = seeds()
    out = Path(args.out)
    counts = {"ok": 0, "error": 0, "crash": 0, "hang": 0, "other exception": 0}
    deadline = time.monotonic() + args.seconds
    context = mp.get_context("fork")
    while time.monotonic() < deadline:
        blob = mutate(corpus[rng.integers(len(corpus))], rng)
        queue = context.Queue()
        process = context.Process(target=decode_one, args=(blob, args.backend, queue))
        process.start()
        process.join(60)
        if process.is_alive():
            process.kill()
            outcome = "hang"
        elif process.exitcode != 0:
            outcome = "crash" if process.exitcode < 0 else "other exception"
        else:
            outcome = queue.get()
        counts[outcome] += 1
        if outcome not in ("ok", "error"):
            out.mkdir(exist_ok=True)
            (out / f"{outcome}_{sum(counts.values())}.mp4").write_bytes(blob)
    print(args.backend, counts)
    sys.exit(1 if counts["crash"] or counts["hang"] or counts["other exception"] else 0)


if __name__ == "__main__":
    main()
