"""Procedural images that are not head MRI, for the out-of-distribution check's classifier (outlier exposure).

A model that has seen only head MRI cannot tell by itself that a photograph is not one; shown examples of
"anything else" it learns the boundary (Hendrycks et al., "Deep Anomaly Detection with Outlier Exposure",
ICLR 2019). The examples here are made from nothing, so no real photograph, map or scan is needed or seen:
dead-leaves images (occluding shapes with a power-law size distribution, whose statistics resemble natural
images'), 1/f^beta random fields (clouds, textures), relief cut by its own drainage (terrain maps), gratings,
text-like pages and a textured object on a flat background (a head is an object on a background too, so the
classifier must look inside it). Each image is stacked into a volume with a small drift per slice, as a user
might stack pictures into a NIfTI.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator

import numpy as np
from scipy import ndimage

from BrainDINOLib.volume import Volume, volume_from_array

SLICES = 16


def power_law_field(rng: np.random.Generator, size: int, beta: float) -> np.ndarray:
    """A random field whose power spectrum falls as 1 / f^beta (beta 1: fine texture, 3: smooth relief)."""
    frequency = np.fft.fftfreq(size)
    radius = np.hypot(frequency[:, None], frequency[None])
    radius[0, 0] = 1.0
    return np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(size, size))) / radius ** (beta / 2)))


def dead_leaves(rng: np.random.Generator, size: int, texture: float = 0.0) -> np.ndarray:
    """Ellipses and rectangles of random grey levels dropped on each other, sizes from a power law; with
    ``texture``, some carry a 1/f texture."""
    image = np.full((size, size), rng.uniform())
    rows, cols = np.mgrid[:size, :size]
    for _ in range(rng.integers(60, 400)):
        half_width = size * 0.6 * rng.uniform(0.02, 1) ** 3 + 1.5
        half_height = half_width * rng.uniform(0.3, 1)
        centre_row, centre_col, angle = *rng.uniform(0, size, 2), rng.uniform(0, np.pi)
        u = (cols - centre_col) * np.cos(angle) + (rows - centre_row) * np.sin(angle)
        v = (rows - centre_row) * np.cos(angle) - (cols - centre_col) * np.sin(angle)
        if rng.uniform() < 0.7:
            shape = (u / half_width) ** 2 + (v / half_height) ** 2 < 1
        else:
            shape = (np.abs(u) < half_width) & (np.abs(v) < half_height)
        image[shape] = rng.uniform()
        if texture and rng.uniform() < 0.3:
            image[shape] += texture * power_law_field(rng, size, 2.5)[shape]
    return ndimage.gaussian_filter(image, rng.uniform(0, 1.5))


NEIGHBOURS = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc]


def drainage(height: np.ndarray) -> np.ndarray:
    """How many cells drain through each cell (itself included). Water leaves by the map's edge: flooding inward
    from the edge, lowest first (priority flood, which also fills pits), each cell drains to the cell the flood
    reached it from."""
    rows, cols = height.shape
    reached = np.zeros(height.shape, bool)
    reached[[0, -1]], reached[:, [0, -1]] = True, True
    queue = [(height[r, c], r, c) for r, c in zip(*np.nonzero(reached), strict=True)]
    heapq.heapify(queue)
    order, receiver = [], {}
    while queue:
        level, row, col = heapq.heappop(queue)
        order.append((row, col))
        for dr, dc in NEIGHBOURS:
            r, c = row + dr, col + dc
            if 0 <= r < rows and 0 <= c < cols and not reached[r, c]:
                reached[r, c] = True
                receiver[r, c] = (row, col)
                heapq.heappush(queue, (max(height[r, c], level), r, c))
    flow = np.ones(height.shape)
    for cell in reversed(order):  # upstream before downstream
        if cell in receiver:
            flow[receiver[cell]] += flow[cell]
    return flow


def eroded_relief(rng: np.random.Generator, size: int) -> np.ndarray:
    """A terrain map: smooth tilted relief cut by a branching valley network. Streams run where the drainage
    of a roughened copy gathers enough cells; the land rises with the distance to the nearest stream."""
    rows, cols = np.mgrid[:size, :size] / size
    angle = rng.uniform(0, 2 * np.pi)
    base = power_law_field(rng, size, rng.uniform(3, 4))
    base = (base - base.min()) / np.ptp(base) + rng.uniform(0, 1) * (rows * np.cos(angle) + cols * np.sin(angle))
    roughness = power_law_field(rng, size, 2.0)
    streams = drainage(base + 0.15 * base.std() * roughness / roughness.std()) > rng.uniform(30, 300) * size / 128
    relief = (ndimage.distance_transform_edt(~streams) / size) ** rng.uniform(0.5, 1)
    return ndimage.gaussian_filter(base + rng.uniform(0.5, 2) * relief / relief.max(), rng.uniform(0.5, 1.5))


def grating(rng: np.random.Generator, size: int) -> np.ndarray:
    """Stripes of random orientation and frequency, hard-edged or sinusoidal over a 1/f texture."""
    rows, cols = np.mgrid[:size, :size] / size
    angle, cycles = rng.uniform(0, np.pi), rng.uniform(3, 40)
    wave = np.sin(2 * np.pi * cycles * (cols * np.cos(angle) + rows * np.sin(angle)))
    return (wave > 0).astype(float) if rng.uniform() < 0.5 else wave + 0.5 * power_law_field(rng, size, 2.0)


def page(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dark word-like blocks in lines on a light page."""
    image = np.ones((size, size))
    row = rng.integers(4, 20)
    while row < size - 8:
        height, col = rng.integers(3, 8), rng.integers(4, 20)
        while col < size - 10:
            width = rng.integers(2, 12)
            image[row : row + height, col : col + width] = rng.uniform(0, 0.3)
            col += width + rng.integers(1, 4)
        row += height + rng.integers(2, 10)
    return image


def textured_object(rng: np.random.Generator, size: int) -> np.ndarray:
    """An ellipse filled with dead leaves or a 1/f texture, on a dark flat background."""
    rows, cols = np.mgrid[:size, :size]
    centre = size / 2 + rng.normal(0, size / 12, 2)
    axes = size * rng.uniform(0.25, 0.45, 2)
    inside = ((cols - centre[0]) / axes[0]) ** 2 + ((rows - centre[1]) / axes[1]) ** 2 < 1
    texture = dead_leaves(rng, size, 0.2) if rng.uniform() < 0.5 else power_law_field(rng, size, rng.uniform(1, 3))
    return np.where(inside, texture - texture.min() + 0.2, rng.uniform(0, 0.1))


KINDS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "dead leaves": dead_leaves,
    "textured dead leaves": lambda rng, size: dead_leaves(rng, size, 0.3),
    "1/f field": lambda rng, size: power_law_field(rng, size, rng.uniform(1, 3.5)),
    "eroded relief": eroded_relief,
    "grating": grating,
    "page": page,
    "textured object": textured_object,
}


def outlier_volume(seed: int) -> Volume:
    """One stacked non-MRI volume (its kind cycles with ``seed``): positive intensities at a random scale,
    sometimes noisy, 16 slices drifting by a few pixels, 0.5-2 mm pixels and 3 mm slices."""
    rng = np.random.default_rng(seed)
    kind = list(KINDS)[seed % len(KINDS)]
    size = int(rng.choice([128, 192, 256]))
    image = KINDS[kind](rng, size)
    image = (image - image.min()) * rng.uniform(50, 3000)
    if rng.uniform() < 0.5:
        image = image + rng.normal(0, image.std() * rng.uniform(0, 0.1), image.shape)
    step, pixel = int(rng.integers(0, 4)), float(rng.choice([0.5, 1.0, 2.0]))
    stack = np.stack([np.roll(image, (step * i, step * i // 2), axis=(0, 1)) for i in range(SLICES)], axis=2)
    return volume_from_array(np.abs(stack).astype(np.float32), np.diag([pixel, pixel, 3.0, 1.0]), f"{kind} {seed}")


def outlier_volumes(count: int, seed: int = 0) -> Iterator[Volume]:
    """``count`` volumes of every kind in turn, reproducible from ``seed``."""
    for index in range(count):
        yield outlier_volume(seed * 100_003 + index)
