#!/usr/bin/env python3
"""Largest per-channel pixel difference between two 8-bit PNGs (standard library only).

    python3 cross/png_diff.py a.png b.png [--max 2]

Prints "identical bytes", or the largest difference and how many samples differ;
exits 1 when the largest difference is above --max (default 2, out of 255) or the
sizes differ.
"""
import argparse
import struct
import sys
import zlib

CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


def decode(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        sys.exit(f"{path}: not a PNG file")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in CHANNELS or interlace:
        sys.exit(f"{path}: only 8-bit, non-interlaced grey/RGB(A) PNGs are supported")
    bpp = CHANNELS[colour]
    stride = width * bpp
    raw = zlib.decompress(idat)
    rows, prev = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if kind == 1:
                line[x] = (line[x] + a) & 255
            elif kind == 2:
                line[x] = (line[x] + b) & 255
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(line)
        prev = line
    return (width, height, bpp), b"".join(rows)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--max", type=int, default=2)
    args = parser.parse_args()
    if open(args.a, "rb").read() == open(args.b, "rb").read():
        print("identical bytes")
        return
    (shape_a, pixels_a), (shape_b, pixels_b) = decode(args.a), decode(args.b)
    if shape_a != shape_b:
        print(f"sizes differ: {shape_a} vs {shape_b}")
        sys.exit(1)
    diffs = [abs(p - q) for p, q in zip(pixels_a, pixels_b)]
    largest = max(diffs)
    print(f"max difference {largest}/255, {sum(d > 0 for d in diffs)} of {len(diffs)} samples differ")
    sys.exit(0 if largest <= args.max else 1)


if __name__ == "__main__":
    main()
