"""Decode + tile + normalise throughput of the processor against the reference's per-tile path.

    .venv/bin/python bench/processing.py            # ~15 s on one core
    .venv/bin/python bench/processing.py --repeat 5 --threads 1

Images: synthetic photo-like JPEGs (smooth gradients, shapes, sensor noise; quality 90) at 640x480,
1920x1080 and 4000x3000, generated with a fixed seed. Both paths run single-threaded in this
process, so images/s is per core.

Baseline = what the reference does (docs/phantom.md#image-tiling), written with PIL + torch ops equal to torchvision's
(torchvision has no build for this torch): decode -> ``convert('RGB')`` -> ``pil_to_tensor`` (the
reference keeps images as uint8 (3,H,W) tensors) -> ``to_pil_image`` -> ``dynamic_preprocess``
(resize, crop tiles, thumbnail) -> per tile ``Resize((448,448), BICUBIC)`` + ``ToTensor`` +
``Normalize`` -> ``stack``.
Ours = ``tile_pixel_values(load_image(jpeg_bytes))``: one resize, tiles sliced from channel planes,
one vectorised normalisation.
Prints images/s for each path and size, the ratio, the largest output difference (in 1/255
pixel units; must stay below 1), and the rate of decode + PIL resizes alone: that work is the same
in both paths (docs/phantom.md#image-tiling: PIL's bicubic is needed for exact tiles), so it bounds the possible ratio.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from phantom_ray.processing import candidate_grids, choose_grid, load_image, tile_pixel_values

SIZES = [(640, 480), (1920, 1080), (4000, 3000)]
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(-1, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(-1, 1, 1)


def make_photo(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([
        128 + 100 * np.sin(xx / w * 3 + c) * np.cos(yy / h * 2 - c) for c in (0.0, 1.0, 2.0)
    ], axis=-1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(w // 40 + 1, w // 6 + 2))
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x0 + r, y0 + r), fill=col)
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ---- baseline: the reference's path ---------------------------------------------------------------

def pil_to_tensor(pic: Image.Image) -> torch.Tensor:  # torchvision.transforms.functional.pil_to_tensor
    img = torch.as_tensor(np.array(pic, copy=True))
    return img.view(pic.size[1], pic.size[0], 3).permute((2, 0, 1))


def to_pil_image(t: torch.Tensor) -> Image.Image:  # torchvision to_pil_image for uint8 (3,H,W)
    return Image.fromarray(np.transpose(t.cpu().numpy(), (1, 2, 0)), "RGB")


def dynamic_preprocess(image: Image.Image, min_num=1, max_num=6, image_size=448, use_thumbnail=True):
    w, h = image.size
    cols, rows = choose_grid(w, h, image_size, min_num, max_num, candidate_grids(min_num, max_num))
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = []
    for i in range(cols * rows):
        box = ((i % cols) * image_size, (i // cols) * image_size,
               ((i % cols) + 1) * image_size, ((i // cols) + 1) * image_size)
        tiles.append(resized.crop(box))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def build_transform(img: Image.Image, size: int = 448) -> torch.Tensor:
    img = img.convert("RGB") if img.mode != "RGB" else img  # T.Lambda
    img = img.resize((size, size), Image.BICUBIC)  # T.Resize((448,448), BICUBIC) on a PIL image
    x = torch.from_numpy(np.array(img, np.uint8, copy=True))  # T.ToTensor
    x = x.view(img.size[1], img.size[0], 3).permute((2, 0, 1)).contiguous().to(torch.float32).div(255)
    x = x.clone()  # T.Normalize (inplace=False)
    return x.sub_(MEAN).div_(STD)


def baseline(data: bytes) -> torch.Tensor:
    image = pil_to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))
    tiles = dynamic_preprocess(to_pil_image(image))
    return torch.stack([build_transform(t) for t in tiles])


def ours(data: bytes) -> torch.Tensor:
    return tile_pixel_values(load_image(data))


def floor(data: bytes) -> None:
    """Decode + the two PIL bicubic resizes alone: work both paths must do to stay exact."""
    img = Image.open(io.BytesIO(data))
    img.load()
    cols, rows = choose_grid(*img.size)
    img.resize((448 * cols, 448 * rows), Image.BICUBIC)
    if cols * rows > 1:
        img.resize((448, 448), Image.BICUBIC)


def timeit(fn, data: bytes, repeat: int) -> float:
    fn(data)  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(data)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (images/s is divided by this)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    photos = {f"{w}x{h}": make_photo(w, h, seed=i) for i, (w, h) in enumerate(SIZES)}
    print(f"torch threads: {args.threads}; repeat: {args.repeat} (median)")
    print(f"{'image':>10} {'tiles':>5} {'jpeg KB':>8} {'baseline img/s':>15} {'ours img/s':>11} {'ratio':>6} "
          f"{'max diff (1/255)':>17} {'decode+resize only img/s':>25}")
    tb_total = to_total = tf_total = 0.0
    worst = 0.0
    for name, data in photos.items():
        b, o = baseline(data), ours(data)
        if b.shape != o.shape:
            raise SystemExit(f"{name}: shapes differ {tuple(b.shape)} vs {tuple(o.shape)}")
        diff = float(((b - o).abs() * STD).max() * 255)  # back to pixel units
        worst = max(worst, diff)
        tb, to, tf = (timeit(f, data, args.repeat) for f in (baseline, ours, floor))
        tb_total += tb
        to_total += to
        tf_total += tf
        print(f"{name:>10} {o.shape[0]:>5} {len(data) // 1024:>8} {1 / tb / args.threads:>15.2f} "
              f"{1 / to / args.threads:>11.2f} {tb / to:>6.2f} {diff:>17.2e} {1 / tf / args.threads:>25.2f}")
    n = len(photos)
    print(f"{'all':>10} {'':>5} {'':>8} {n / tb_total / args.threads:>15.2f} {n / to_total / args.threads:>11.2f} "
          f"{tb_total / to_total:>6.2f} {worst:>17.2e} {n / tf_total / args.threads:>25.2f}")
    print(f"decode + PIL resizes are {tf_total / tb_total:.0%} of the baseline's time and {tf_total / to_total:.0%} "
          "of ours (the rest is tensor conversion and normalisation)")
    print(f"ratio (ours / baseline, images per second per core, mixed set): {tb_total / to_total:.2f}x; "
          f"outputs identical within 1/255: {worst < 1.0}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
